"""Output directories moe-ray writes files into (`plot --out`, `make-tiny --out`): only an empty
directory or one that moe-ray made, and never a file moe-ray did not write.

A directory moe-ray writes into gets a marker, `.moe-ray-output.json`, before anything else, naming
the command and the files it wrote. Claiming a directory again (`claim_output_dir`) removes only
those files (what a previous run left, so no stale figure survives) and keeps everything else; a
file someone else put where the command writes is refused, with its name, before anything changes.

A command writes into a staging folder, `.moe-ray-partial/`, and `finish()` lists the staged files
in the marker and only then moves them into place. So a run that dies half-way owns exactly its
staging folder (and, if it died while moving, the files the marker lists): files someone adds to
the directory afterwards are never taken for moe-ray's. Symbolic links inside the directory are
never followed: a link where the command writes (`figures/` pointing into a user folder) is refused.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import MoeRayError
from .lease import hold_output, release_output

MARKER = ".moe-ray-output.json"
STAGING = ".moe-ray-partial"


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
    """Every file and link under `root` (links not followed), as relative `/`-separated paths (the
    marker and the staging folder excluded)."""
    out = set()
    for folder, dirs, names in os.walk(root):
        rel = os.path.relpath(folder, root)
        if rel == ".":
            dirs[:] = [d for d in dirs if d != STAGING or os.path.islink(os.path.join(folder, d))]
        for name in names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
            if path != MARKER:
                out.add(path)
    return out


def _link_on_the_way(root: Path, rel: str) -> str | None:
    """The first folder of `rel` below `root` that is a symbolic link (writing there would write
    through it into someone else's folder), or None."""
    parts = rel.split("/")[:-1]
    for n in range(1, len(parts) + 1):
        if os.path.islink(root.joinpath(*parts[:n])):
            return "/".join(parts[:n])
    return None


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


@dataclass
class OutputDir:
    """A claimed output directory: write into `path` (the staging folder), then call `finish()`,
    which moves what was written into `final` and records it; `final_path` maps a written path to
    where it ends up."""

    final: Path
    kind: OutputKind
    foreign: frozenset[str]

    @property
    def path(self) -> Path:
        return self.final / STAGING

    def final_path(self, written: Path) -> Path:
        """Where a file written under `path` is once `finish()` has moved it."""
        return self.final / Path(written).relative_to(self.path)

    def finish(self) -> None:
        """List the staged files in the marker, then move them into place and mark the run finished.
        Refused, leaving everything staged, if a link or someone else's file has appeared where one
        of them goes."""
        staged = sorted(_files(self.path))
        folders = sorted(os.path.relpath(folder, self.path).replace(os.sep, "/")
                         for folder, _, _ in os.walk(self.path) if folder != str(self.path))
        for rel in staged + [f"{folder}/" for folder in folders]:
            link = _link_on_the_way(self.final, rel)
            if link is not None:
                raise OutputError(f"{self.final / link} is a symbolic link; moe-ray never writes through links "
                                  f"in an output directory: remove it and run again (the output is in {self.path})")
            if not rel.endswith("/") and os.path.lexists(self.final / rel):
                raise OutputError(f"{self.final / rel} appeared while moe-ray {self.kind.command} ran and was "
                                  f"not written by moe-ray: move it and run again (the output is in {self.path})")
        _write_marker(self.final, self.kind, staged, self.foreign, finished=False)  # listed before moved
        for folder in folders:  # (empty ones too: a report without figures still has figures/)
            (self.final / folder).mkdir(parents=True, exist_ok=True)
        for rel in staged:
            (self.final / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path / rel, self.final / rel)
        shutil.rmtree(self.path)
        _write_marker(self.final, self.kind, staged, self.foreign, finished=True)
        release_output(self.final)


def _write_marker(path: Path, kind: OutputKind, files: list[str], foreign: frozenset[str], finished: bool) -> None:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    hold_output(path, command)  # one writer at a time (moe_ray.lease), before anything in it is read or written
    try:
        return _claim(path, kind, replace, command)
    except BaseException:
        release_output(path)
        raise


def _claim(path: Path, kind: OutputKind, replace: bool, command: str) -> OutputDir:
    """`claim_output_dir` under the directory's lease."""
    staging, marker_file = path / STAGING, path / MARKER
    for special in (staging, marker_file):
        if os.path.islink(special):
            raise OutputError(f"{special} is a symbolic link; moe-ray never writes through links in an output "
                              "directory: remove it, or choose another --out")
    present = _files(path) if path.exists() else set()
    if not present and not marker_file.exists():
        path.mkdir(parents=True, exist_ok=True)
        _write_marker(path, kind, [], frozenset(), finished=False)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
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
        # finished or not, the marker lists every file moe-ray put in place (a run that died keeps
        # the rest of its output in the staging folder)
        ours = present & set(marker.get("files", []))
    elif staging.exists():
        raise OutputError(f"{path} has a {STAGING} folder but no {MARKER}; moe-ray will not write into it: "
                          "choose another --out")
    elif kind.legacy is not None and kind.legacy(path):
        ours = {p for p in present if _matches(p, kind.patterns)}
    else:
        raise OutputError(f"{path} is not empty and was not made by moe-ray (no {MARKER}); moe-ray writes only "
                          "into an empty directory or one it made, and never over other files: choose another "
                          "--out, or empty it yourself")
    foreign = present - ours
    folders = {pattern.split("/")[0] for pattern in kind.patterns if "/" in pattern}
    clash = sorted(foreign if kind.exclusive else {p for p in foreign if _matches(p, kind.patterns) or p in folders})
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
    _write_marker(path, kind, [], frozenset(foreign), finished=False)  # removed: no longer ours to remove
    shutil.rmtree(staging, ignore_errors=True)  # what a run that died had staged
    staging.mkdir()
    return OutputDir(path, kind, frozenset(foreign))


def _legacy_report(path: Path) -> bool:
    """A report `moe-ray plot` wrote before markers existed: its index.html is moe-ray's."""
    try:
        with open(path / "index.html", "rb") as f:
            return b"<title>moe-ray report" in f.read(400)
    except OSError:
        return False


PLOT_OUTPUT = OutputKind("plot", ("index.html", "figures/*", "tables/*", "inputs/*"), legacy=_legacy_report)
"""`moe-ray plot --out DIR`: index.html, figures/, tables/ and inputs/; other files in DIR are left alone."""

TINY_OUTPUT = OutputKind("make-tiny", ("*",), exclusive=True,
                         legacy=lambda path: (path / "moe_ray_tiny.json").is_file())
"""`moe-ray make-tiny --out DIR`: a checkpoint, which must hold nothing else."""

__all__ = ["MARKER", "PLOT_OUTPUT", "STAGING", "TINY_OUTPUT", "OutputDir", "OutputError", "OutputKind", "claim_output_dir"]
