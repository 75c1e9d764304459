"""Where checkpoints and stores live: the one place that turns a location (a local path or an fsspec URL:
file://, s3://, gs://, hf://, ...) into a filesystem, with the spec's `storage_options`.

Credentials and endpoints come the standard way: the filesystem's own (AWS_* variables and
AWS_ENDPOINT_URL for s3://, gcloud's for gs://, HF_TOKEN for hf://), or `storage_options` in the spec,
passed to fsspec for the model, the reference and the store alike. A process runs with one set of
options (`use_storage_options`): the driver takes the spec's, and every Ray task and shard actor takes
the same from its plan before it opens anything, since workers do not inherit the driver's
environment.

Everything remote is read by byte range (`read_range`, fsspec's `cat_file`): an s3fs file opened the
default way reads ahead in blocks of megabytes, far more than a header or one expert's tensor.
Errors of the object store (no credentials, no bucket, access denied, an endpoint that does not
answer) become one line naming the URL (`describe_error`).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import fsspec

from .errors import MoeRayError, SpecError, StorageError

LOCAL_PROTOCOLS = ("file", "local")
COMMON_PROTOCOLS = ("file", "s3", "gs", "hf", "az", "http")
"""Named in the refusal of an unknown protocol (fsspec knows more: any it knows is accepted)."""
IN_PROCESS_PROTOCOLS = ("memory",)
"""Filesystems that live inside one process: Ray workers cannot see them."""

_options: dict[str, Any] = {}


def protocol(location: str) -> str:
    """The location's protocol: `file` for a local path or file:// URL, else the URL's scheme
    (the first of a chained URL such as simplecache::s3://)."""
    location = str(location)
    if "://" not in location:
        return "file"
    scheme = location.split("://", 1)[0].split("::", 1)[0]
    return "file" if scheme in LOCAL_PROTOCOLS else scheme


def is_local(location: str) -> bool:
    """A local path or a file:// URL (read with the OS, memory-mapped by safetensors)."""
    return protocol(location) == "file"


def local_path(location: str) -> str:
    """The OS path of a local location (file:// stripped)."""
    location = str(location)
    for prefix in ("file://", "local://"):
        if location.startswith(prefix):
            return location[len(prefix):]
    return location


def check_location(location: str, what: str, in_process: bool = False) -> None:
    """Refuse, as one SpecError line, a location no worker could open: an unknown protocol (naming the
    known ones), one whose filesystem is not installed, or (unless the run is `in_process`) one that
    lives in this process's memory."""
    proto = protocol(location)
    if proto == "file":
        return
    if proto not in fsspec.available_protocols():
        raise SpecError(f"{what} {location}: unknown protocol {proto}://; moe-ray reads local paths and fsspec "
                        f"URLs ({', '.join(p + '://' for p in COMMON_PROTOCOLS)}, ...)")
    if proto in IN_PROCESS_PROTOCOLS and not in_process:
        raise SpecError(f"{what} {location}: {proto}:// lives in one process's memory, which the Ray workers "
                        "cannot see; use a local path or an object store URL")
    try:
        fsspec.get_filesystem_class(proto)
    except (ImportError, ValueError) as exc:
        raise SpecError(f"{what} {location}: {proto}:// needs a package that is not installed: "
                        f"{str(exc).strip().splitlines()[0]}") from None


def absolute(location: str | None) -> str | None:
    """A local path as an absolute one with `~` expanded (file:// URLs too, keeping the scheme): workers,
    a job's driver and the head resolve relative paths from their own directories. URLs unchanged."""
    if location is None or not is_local(location) or not str(location).strip():
        return location
    location = str(location)
    path = str(Path(os.path.expanduser(local_path(location))).absolute())
    return ("file://" + path) if location.startswith("file://") else path


# ---- options --------------------------------------------------------------------------------------

def storage_options() -> dict[str, Any]:
    """The storage options this process runs with (see `use_storage_options`)."""
    return dict(_options)


def set_storage_options(options: Mapping[str, Any] | None) -> None:
    """Set this process's storage options (a Ray worker: for the rest of its life, from its plan)."""
    global _options
    _options = dict(options or {})


@contextlib.contextmanager
def use_storage_options(options: Mapping[str, Any] | None) -> Iterator[None]:
    """Run the block with these storage options, then put the previous ones back."""
    previous = storage_options()
    set_storage_options(options)
    try:
        yield
    finally:
        set_storage_options(previous)


def with_storage_options(fn, options: Mapping[str, Any] | None):
    """`fn` wrapped to run with `options` (a Ray task's function: the worker opens URLs as the driver
    does)."""
    options = dict(options or {})

    def run_with_options(*args, **kwargs):
        with use_storage_options(options):
            return fn(*args, **kwargs)

    run_with_options.__name__ = getattr(fn, "__name__", "unit")
    run_with_options.__qualname__ = getattr(fn, "__qualname__", run_with_options.__name__)
    run_with_options.__module__ = getattr(fn, "__module__", __name__)
    return run_with_options


def options_for(location: str) -> dict[str, Any]:
    """The fsspec options for opening `location`: none for local and in-memory paths, else this
    process's storage options: all of them, or, where they are tables named by protocol
    (`{"s3": {...}, "hf": {...}}`, for a model and a store in different places), the table of the
    location's protocol."""
    proto = protocol(location)
    if proto == "file" or proto in IN_PROCESS_PROTOCOLS:
        return {}
    options = storage_options()
    if options and all(isinstance(v, dict) and k in fsspec.available_protocols() for k, v in options.items()):
        return dict(options.get(proto, {}))
    return options


def filesystem(location: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding `location` and the path on it (fsspec's `url_to_fs` with this process's
    storage options)."""
    location = str(location)
    if is_local(location):
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(local_path(location)))
    try:
        return fsspec.core.url_to_fs(location, **options_for(location))
    except (ImportError, ValueError, TypeError) as exc:
        raise SpecError(f"cannot open {location}: {type(exc).__name__}: {_first_line(exc)}") from None


def read_range(fs: fsspec.AbstractFileSystem, path: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file, fetched as exactly that range (no read-ahead)."""
    if end <= start:
        return b""
    return fs.cat_file(path, start=start, end=end)


def read_file(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """A whole (small) file: config.json, an index, a tokenizer file."""
    return fs.cat_file(path)


# ---- errors ---------------------------------------------------------------------------------------

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe_error(exc: BaseException, location: str) -> str | None:
    """What an object store's (or the OS's) error means for `location`, as a phrase the caller puts
    after the location ("no such bucket (...)", "permission denied (...)"); None for errors that are
    not about reaching storage (a bug, a format problem)."""
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    text = _first_line(exc)
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        hint = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or key and secret in the "
                "spec's storage_options" if protocol(location) in ("s3", "s3a") else "give credentials in the "
                "spec's storage_options or the filesystem's environment variables")
        return f"no credentials ({text}); {hint}"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError",
                "ServerDisconnectedError", "ConnectionClosedError") or isinstance(exc, (ConnectionError, TimeoutError)):
        return f"cannot reach the storage ({text})"
    if isinstance(exc, FileNotFoundError) and "bucket" in text.lower():
        return f"no such bucket ({text})"
    if isinstance(exc, PermissionError) or name in ("AccessDenied", "Forbidden"):
        return f"permission denied ({text})"
    if isinstance(exc, OSError) and exc.errno is not None:
        named = str(exc.filename) if exc.filename else ""
        same = not named or named.rstrip("/") in (location.rstrip("/"), local_path(location).rstrip("/"))
        return os.strerror(exc.errno).lower() + ("" if same else f" ({named})")
    if module.startswith(("botocore", "aiobotocore", "s3fs", "gcsfs", "google", "huggingface_hub",
                          "aiohttp", "requests", "urllib3")):
        return f"{name}: {text}"
    if isinstance(exc, OSError):
        return text
    return None


@contextlib.contextmanager
def storage_errors(location: str, error: type[MoeRayError], doing: str) -> Iterator[None]:
    """Inside, an error about reaching storage (`describe_error`) becomes one line, `error(f"{doing}: {why}")`;
    moe-ray's own errors and every other error (a bug, a format problem) pass unchanged."""
    try:
        yield
    except MoeRayError:
        raise
    except Exception as exc:
        why = describe_error(exc, location)
        if why is None:
            raise
        raise error(f"{doing}: {why}") from None


def probe_write(location: str) -> None:
    """Prove that a store can be created at (or written into) `location`, writing nothing that stays:
    a small object beside where the store's own documents will go, deleted at once. On a local disk
    the nearest existing directory is probed (a read-only filesystem, a path under a regular file, a
    symlink loop are found here, before any work); in object storage the bucket must exist and take
    a write. Raises StorageError naming the location and the problem."""
    if is_local(location):
        _probe_local(local_path(location))
        return
    fs, path = filesystem(location)
    probe = f"{path.rstrip('/')}/.moe-ray-write-probe-{uuid.uuid4().hex}"
    with storage_errors(location, StorageError, f"cannot write the store {location}"):
        fs.pipe_file(probe, b"moe-ray write probe")
        fs.rm_file(probe)


def _probe_local(path: str) -> None:
    path = os.path.abspath(os.path.expanduser(path))
    target = path
    try:
        while True:
            try:
                os.stat(target)  # follows symlinks: ELOOP for a loop, ENOTDIR under a regular file
                break
            except FileNotFoundError:
                parent = os.path.dirname(target)
                if parent == target:
                    break
                target = parent
        if not os.path.isdir(target):
            what = "is a regular file" if os.path.isfile(target) else "is not a directory"
            raise StorageError(f"cannot create the store {path}: {target} {what}")
        fd, probe = tempfile.mkstemp(prefix=".moe-ray-write-probe-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except StorageError:
        raise
    except OSError as exc:
        reason = os.strerror(exc.errno).lower() if exc.errno else _first_line(exc)
        where = f" (writing in {target})" if target != path else ""
        raise StorageError(f"cannot create the store {path}: {reason}{where}") from None


def fetch_files(location: str, names: list[str], into: str) -> list[str]:
    """Copy the files `names` of the directory `location` (any filesystem) into the local directory
    `into`; the names copied (those that exist)."""
    fs, root = filesystem(location)
    copied = []
    for name in names:
        path = f"{root.rstrip('/')}/{name}"
        if not fs.isfile(path):
            continue
        Path(into, name).write_bytes(read_file(fs, path))
        copied.append(name)
    return copied


__all__ = ["absolute", "check_location", "describe_error", "fetch_files", "filesystem",
           "is_local", "local_path", "options_for", "probe_write", "protocol", "read_file", "read_range",
           "set_storage_options", "storage_options", "use_storage_options", "with_storage_options"]
