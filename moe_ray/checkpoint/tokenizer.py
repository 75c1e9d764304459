"""A checkpoint's tokenizer, read through the same filesystem as its weights.

transformers' `AutoTokenizer.from_pretrained(location)` takes any string it cannot find on disk for a
hub repo id, so an s3:// or file:// checkpoint would be looked up on the hub. Instead the tokenizer's
files are copied (by `moe_ray.fs`, with the run's storage options) into a private temporary
directory and loaded from there, offline; local checkpoints go the same way, so a named pipe or a
directory in place of a tokenizer file is skipped, never waited on.
"""
from __future__ import annotations

import tempfile

from .. import fs as storage
from ..data import InputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
"""One of these makes a checkpoint's tokenizer (the files of TOKENIZER_SUPPORT only help load it)."""
TOKENIZER_SUPPORT = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "merges.txt",
                     "config.json", "chat_template.jinja")


def load_tokenizer(location: str):
    """The checkpoint's tokenizer (transformers' AutoTokenizer), loaded offline from copies of its files.
    A checkpoint without one, or whose files transformers cannot load, is an InputError naming it."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    with tempfile.TemporaryDirectory(prefix="moe-ray-tokenizer-") as local:
        with storage.storage_errors(location, InputError, f"cannot read the tokenizer of {location}"):
            copied = storage.fetch_files(location, list(TOKENIZER_FILES + TOKENIZER_SUPPORT), local)
        if not set(copied) & set(TOKENIZER_FILES):
            raise InputError(f"no tokenizer in {location} (tokenizer.json, tokenizer.model or a vocabulary "
                             "file); dynamic analyses need the checkpoint's tokenizer")
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # config.json model types transformers lacks (deepseek, grok) are expected
        try:
            return AutoTokenizer.from_pretrained(local, local_files_only=True)
        except Exception as exc:
            text = str(exc).strip()
            first = text.splitlines()[0] if text else ""
            raise InputError(f"cannot load the tokenizer of {location} ({', '.join(copied)}): "
                             f"{type(exc).__name__}: {first}") from None
        finally:
            hf_logging.set_verbosity(level)
