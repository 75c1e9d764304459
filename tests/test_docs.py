"""The documentation stays true to itself and to the code: every relative link in README.md, docs/,
benchmarks/README.md and cluster/README.md reaches a file of the repository (and its anchor a heading of
that file), and the spec-field table in docs/spec.md is the one `moe_ray.spec` generates.

After changing a spec field (its default or its `help`), regenerate the table with

    python tests/test_docs.py            # rewrites the block between the spec-fields markers
"""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", ROOT / "cluster" / "README.md",
        *sorted((ROOT / "docs").glob("*.md"))]
SPEC_PAGE = ROOT / "docs" / "spec.md"
BEGIN, END = "<!-- spec-fields:begin -->", "<!-- spec-fields:end -->"

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a file's headings: lower case, punctuation dropped (hyphens and
    underscores kept), spaces as hyphens, a repeated heading suffixed -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for line in _FENCE.sub("", markdown).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def links(markdown: str) -> list[str]:
    """Link targets outside code blocks and code spans."""
    return _LINK.findall(_CODE.sub("", _FENCE.sub("", markdown)))


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Each link of `page` that leaves `root` (the repository), names a missing file or a missing anchor."""
    problems = []
    for target in links(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http(s), mailto: outside the repository by design
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(root)}: ({target})"
        if not file.is_relative_to(root):
            problems.append(f"{where} points outside the repository")
        elif not file.exists():
            problems.append(f"{where}: no such file")
        elif anchor and (file.is_dir() or anchor not in anchors(file.read_text())):
            problems.append(f"{where}: no heading with anchor #{anchor} in {file.relative_to(root)}")
    return problems


def _default(field: dataclasses.Field) -> str:
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return "`" + ",".join(str(v) for v in value) + "`"
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    return f"`{value:g}`" if isinstance(value, float) else f"`{value}`"


def run_flags() -> dict[str, list[str]]:
    """Each spec field's flags as `moe-ray run` really parses them (dest = the field's dotted name)."""
    import argparse

    from moe_ray.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {action.dest: action.option_strings for action in commands.choices["run"]._actions}


def spec_table() -> str:
    """The spec-field table: one row per leaf field of `moe_ray.spec.Spec`, in declaration order,
    with its TOML name, its `moe-ray run` flags, its default and its help text."""
    from moe_ray.spec import spec_fields

    flags = run_flags()
    rows = ["| field (TOML) | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for dotted, _hint, field in spec_fields():
        meaning = field.metadata.get("help", "").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
        flag = " / ".join(f"`{f}`" for f in flags.get(dotted, [])) or "(spec file only)"
        rows.append(f"| `{dotted}` | {flag} | {_default(field)} | {meaning} |")
    return "\n".join(rows)


def _replace_table(text: str, table: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def test_links_and_anchors_resolve():
    problems = [p for page in DOCS for p in broken_links(page)]
    assert not problems, "\n".join(problems)


def test_link_checker_finds_what_is_broken(tmp_path):
    """The checker itself: a missing file, a missing anchor and a path outside the repository are
    reported; a good anchor (with the punctuation GitHub drops) and an external URL are not."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    page = root / "docs" / "page.md"
    page.write_text("# Faults and errors (`moe-ray: error`)\n[a](#faults-and-errors-moe-ray-error) "
                    "[b](https://arxiv.org/abs/2406.18219) [c](nowhere.md) [d](#nope) [e](../../outside.md)\n"
                    "`[f](ignored.md)`\n")
    problems = broken_links(page, root)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "(nowhere.md): no such file",
        "(#nope): no heading with anchor #nope in docs/page.md",
        "(../../outside.md) points outside the repository"]


def test_spec_table_is_generated_from_the_spec():
    text = SPEC_PAGE.read_text()
    assert BEGIN in text and END in text
    assert _replace_table(text, spec_table()) == text, (
        "docs/spec.md's spec-field table differs from moe_ray/spec.py: run `python tests/test_docs.py`")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    SPEC_PAGE.write_text(_replace_table(SPEC_PAGE.read_text(), spec_table()))
    print(f"wrote the spec-field table into {SPEC_PAGE.relative_to(ROOT)}")
