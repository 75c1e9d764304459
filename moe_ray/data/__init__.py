"""Built-in inputs of the dynamic analyses (paper §5): the paper's short prompt and a long
public-domain text (the opening of the US Declaration of Independence, 1776), plus user text files
and corpora of many sequences; and the default corpus of the causal analyses (`corpus.jsonl`: 38 short
public-domain passages, each with its `source`)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import MoeRayError

SHORT_TEXT = "As an open source alternative to"
"""The paper's short input (§5), tokenised with BOS where the tokenizer adds one."""
LONG_FILE = Path(__file__).with_name("declaration.txt")
DEFAULT_CORPUS = Path(__file__).with_name("corpus.jsonl")
"""The corpus used when no `corpus_file` is given: short public-domain passages, one JSON object per line."""
BUILTIN_INPUTS = ("short", "long")


class InputError(MoeRayError):
    """An input text cannot be used (missing, not UTF-8, empty)."""


def read_text_file(path: str | Path) -> str:
    """A user's text file as str; refuses missing, non-UTF-8 and empty files with one line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"text file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"text file {path} is not UTF-8 (byte {exc.start}: {exc.reason}); "
                         "convert it to UTF-8") from None
    if not text.strip():
        raise InputError(f"text file {path} is empty")
    return text


def corpus_texts(path: str | Path) -> list[str]:
    """A corpus file's sequences: a `.jsonl` file's "text" fields (one JSON object per line), or any
    other UTF-8 file's non-empty lines. Refuses files with no sequence or a malformed line."""
    path = Path(path)
    text = read_text_file(path)
    sequences = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"corpus {path} line {number} is not JSON: {exc.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InputError(f'corpus {path} line {number} has no string "text" field')
            line = record["text"]
            if not line.strip():
                raise InputError(f"corpus {path} line {number} has an empty text")
        sequences.append(line)
    return sequences


def corpus_sequences(path: str | Path | None = None, max_sequences: int | None = None) -> list[str]:
    """The corpus's sequences (`corpus_texts`; the default corpus when `path` is None), the first
    `max_sequences` of them when given."""
    sequences = corpus_texts(DEFAULT_CORPUS if path is None else path)
    return sequences if max_sequences is None else sequences[:max_sequences]


def input_text(name: str, text_file: str | None = None) -> str:
    """The text of input `name`: `short`, `long`, or `text` (the user's `text_file`)."""
    if name == "short":
        return SHORT_TEXT
    if name == "long":
        return LONG_FILE.read_text(encoding="utf-8")
    if name == "text":
        if not text_file:
            raise InputError("input 'text' needs a text file (--text-file PATH)")
        return read_text_file(text_file)
    raise InputError(f"unknown input {name!r}; choose short, long or text (with --text-file)")
