"""Output directories moe-ray writes files into (`plot --out`, `make-tiny --out`): only an empty
directory or one that moe-ray made, and never a file moe-ray did not write.

A directory moe-ray writes into gets a marker, `.moe-ray-output.json`, naming the command and, once
it has finished, the files it wrote. Claiming a directory again (`claim_output_dir`) removes only
those files (what a previous run left, so no stale figure survives) and keeps everything else; a
file someone else put where the command writes is refused, with its name, before anything changes.
A run that dies half-way leaves the marker unfinished: the files it had written then count as
moe-ray's (everything but what was there before it started).
"""
from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import MoeRayError
from .lease import hold_output, release_output

MARKER = ".moe-ray-output.json"


@dataclass(frozen=True)
class OutputKind:
    """What a command writes into its output directory.

    `patterns`: the paths (fnmatch, relative, `/`-separated) it may write; `exclusive`: refuse a
    directory holding anything else at all (a checkpoint must hold only the checkpoint); `legacy`:
    recognises a directory this command wrote before markers existed."""

    command: str
    patterns: tuple[str, ...]
    exclusive: bool = False
    legacy: Callable[[Path], bool] | None = None


class OutputError(MoeRayError):
    """An output directory moe-ray may not write into."""


def _files(root: Path) -> set[str]:
    """Every file and link under `root`, as relative `/`-separated paths (the marker excluded)."""
    out = set()
    for folder, dirs, names in os.walk(root):
        rel = os.path.relpath(folder, root)
        for name in names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
            if path != MARKER:
                out.add(path)
    return out


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


@dataclass
class OutputDir:
    """A claimed output directory: write into `path`, then call `finish()` to record what was written."""

    path: Path
    kind: OutputKind
    foreign: frozenset[str]

    def finish(self) -> None:
        """Record the files this run wrote (everything that is not someone else's) in the marker."""
        ours = sorted(_files(self.path) - self.foreign)
        _write_marker(self.path, self.kind, ours, self.foreign, finished=True)
        release_output(self.path)


def _write_marker(path: Path, kind: OutputKind, files: list[str], foreign: frozenset[str], finished: bool) -> None:
    if not finished:  # a run starts writing here: one writer at a time (moe_ray.lease)
        hold_output(path, f"moe-ray {kind.command}")
    marker = {"made_by": f"moe-ray {kind.command}", "version": __version__, "finished": finished,
              "files": sorted(files), "foreign": sorted(foreign)}
    tmp = path / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=1))
    tmp.replace(path / MARKER)


def claim_output_dir(path: str | os.PathLike, kind: OutputKind, replace: bool = True) -> OutputDir:
    """Make `path` ready for `kind.command` to write into, or refuse with one line saying why.

    - missing or empty: created, marked as moe-ray's;
    - made by moe-ray (a marker, or a `kind.legacy` directory): the files moe-ray wrote there are
      removed if `replace` (else refused: the caller asks for --overwrite), everything else is kept;
      a file that is not moe-ray's where the command writes (any file at all if `kind.exclusive`)
      is refused, naming it;
    - anything else (a file, a directory holding other files): refused, nothing touched.
    """
    path = Path(path)
    command = f"moe-ray {kind.command}"
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} is a file, not a directory; choose another --out")
    present = _files(path) if path.exists() else set()
    marker_file = path / MARKER
    if not present and not marker_file.exists():
        path.mkdir(parents=True, exist_ok=True)
        _write_marker(path, kind, [], frozenset(), finished=False)
        return OutputDir(path, kind, frozenset())
    if marker_file.exists():
        try:
            marker = json.loads(marker_file.read_text())
            made_by = marker["made_by"]
        except (OSError, ValueError, KeyError, TypeError):
            raise OutputError(f"{path} has an unreadable {MARKER}; moe-ray will not write into it: choose "
                              "another --out") from None
        if made_by != command:
            raise OutputError(f"{path} was made by {made_by}, not {command}; choose another --out")
        if marker.get("finished"):
            ours = present & set(marker.get("files", []))
        else:  # a run that died half-way: what it found there was not its own
            ours = present - set(marker.get("foreign", []))
    elif kind.legacy is not None and kind.legacy(path):
        ours = {p for p in present if _matches(p, kind.patterns)}
    else:
        raise OutputError(f"{path} is not empty and was not made by moe-ray (no {MARKER}); moe-ray writes only "
                          "into an empty directory or one it made, and never over other files: choose another "
                          "--out, or empty it yourself")
    foreign = present - ours
    clash = sorted(foreign if kind.exclusive else {p for p in foreign if _matches(p, kind.patterns)})
    if clash:
        more = f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""
        raise OutputError(f"{path / clash[0]}{more} was not written by moe-ray and would be overwritten or mixed "
                          f"with {command}'s output; moe-ray never touches files it did not write: move it, or "
                          "choose another --out")
    if ours and not replace:
        raise OutputError(f"{path} holds the output of an earlier {command}; pass --overwrite to replace it")
    _write_marker(path, kind, sorted(ours), frozenset(foreign), finished=False)
    for rel in sorted(ours, key=lambda p: -p.count("/")):
        (path / rel).unlink(missing_ok=True)
    for folder, dirs, names in os.walk(path, topdown=False):  # folders that held only our files
        if folder != str(path) and not os.listdir(folder):
            rel = os.path.relpath(folder, path).replace(os.sep, "/")
            if any(o.startswith(rel + "/") for o in ours):
                os.rmdir(folder)
    return OutputDir(path, kind, frozenset(foreign))


def _legacy_report(path: Path) -> bool:
    """A report `moe-ray plot` wrote before markers existed: its index.html is moe-ray's."""
    try:
        with open(path / "index.html", "rb") as f:
            return b"<title>moe-ray report" in f.read(400)
    except OSError:
        return False


PLOT_OUTPUT = OutputKind("plot", ("index.html", "figures/*", "tables/*"), legacy=_legacy_report)
"""`moe-ray plot --out DIR`: index.html, figures/ and tables/; other files in DIR are left alone."""

TINY_OUTPUT = OutputKind("make-tiny", ("*",), exclusive=True,
                         legacy=lambda path: (path / "moe_ray_tiny.json").is_file())
"""`moe-ray make-tiny --out DIR`: a checkpoint, which must hold nothing else."""

__all__ = ["MARKER", "PLOT_OUTPUT", "TINY_OUTPUT", "OutputDir", "OutputError", "OutputKind", "claim_output_dir"]
