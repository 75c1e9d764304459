"""One writer at a time: a lease on a store (or a `plot --out` directory), held while writing.

The lease is a small JSON document beside what it guards (`<path>.lease`: it survives an
`--overwrite` that deletes and re-creates the store, and exists before the store does), naming its
holder: owner (user@host), host, pid, the process's start time, the command, a random token, and a
heartbeat that a thread of the holder renews every HEARTBEAT_S seconds; the document states that
interval and its expiry (`heartbeat_s`, `stale_after_s`), and readers go by what it states. A second
writer is refused with one line naming the holder. A lease is stale when its holder is dead, and then
taken over:
- on the same host: its pid is gone (or is another process: the start time differs), at once;
- on another host: its document has not changed (no heartbeat) for `stale_after_s` (STALE_S) as the
  taker's own monotonic clock counts, watching it; or, when its heartbeat is already older than that
  by the wall clock, for 3 heartbeat intervals (a holder that renews is seen doing so whatever the two
  hosts' clocks say). So a dead holder on another host blocks for at most STALE_S, and a live one is
  refused as soon as it is seen renewing (within one heartbeat). A live holder is only ever taken
  over if its process does not run at all for STALE_S (stopped with SIGSTOP, a suspended VM) or cannot
  reach the lease's storage that long; if it then finds its lease taken, it stops at once (`on_lost`:
  one line, then SIGTERM to its main thread), never writing on beside the new holder.

Every step is atomic where the lease lives:
- local disks: the lease is written to a temporary file and hard-linked into place (`link` fails if
  the name exists: an exclusive create of a complete document); a stale lease is taken over by
  renaming it to a name of the taker's own (one rename wins) and checking it was the one judged stale;
- S3: `PUT` with `If-None-Match: *` (an exclusive create, S3's conditional writes) and a stale lease
  removed with `DELETE` `If-Match: <its ETag>` (only the document judged stale is removed);
- GCS: every write conditional on the object's generation (`ifGenerationMatch`: 0 to create, the
  generation read to renew or to take a stale lease over, in one write);
- other fsspec filesystems: their exclusive create (`pipe_file(mode="create")`) where they have one.
"""
from __future__ import annotations

import datetime as _dt
import getpass
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from . import interrupt
from .errors import MoeRayError

HEARTBEAT_S = 2.0
"""How often a holder renews its lease (a thread of its own)."""
STALE_S = 15.0
"""A lease whose document has not changed for this long (7 missed renewals) has no living holder."""
CONFIRM_BEATS = 3
"""Heartbeat intervals a lease whose heartbeat is already older than its expiry is watched for before
it is taken over: a holder that is alive renews within one."""
LEGACY_HEARTBEAT_S, LEGACY_STALE_S = 10.0, 120.0
"""What a lease document that states no intervals (written by moe-ray before they were stated) used."""
SUFFIX = ".lease"


class LeaseHeld(MoeRayError):
    """Another writer holds the lease."""


def _now() -> float:
    return time.time()


def _started(pid: int) -> float | None:
    """When process `pid` started (None: no such process)."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


class _Local:
    """The lease document on a local disk."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> tuple[dict | None, Any]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None, None
        return _parse(raw), raw

    def create(self, data: bytes, parents: bool = True) -> bool:
        """Create the lease document exclusively (False: one is there); `parents`: make its folder too."""
        parent = os.path.dirname(os.path.abspath(self.path))
        if parents:
            os.makedirs(parent, exist_ok=True)
        tmp = f"{self.path}.{secrets.token_hex(6)}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def remove_if(self, version: Any) -> bool:
        """Remove the lease if it is still the document `version` (its bytes)."""
        aside = f"{self.path}.{secrets.token_hex(6)}.old"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        with open(aside, "rb") as f:
            moved = f.read()
        if moved == version:
            os.unlink(aside)
            return True
        try:  # another writer's fresh lease: put it back (unless yet another took the name)
            os.link(aside, self.path)
        except FileExistsError:
            pass
        os.unlink(aside)
        return False

    def swap(self, data: bytes, version: Any) -> Any:
        """No conditional replace on a local disk: a stale lease is removed (`remove_if`), then created."""
        return None

    def replace(self, data: bytes, version: Any) -> Any:
        """Replace the lease with `data` (an atomic rename over it: readers never find it missing, so a
        watcher never takes a live holder's lease in between); the holder read it as its own just before."""
        tmp = f"{self.path}.{secrets.token_hex(6)}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path)
        return data


class _Fsspec:
    """The lease document on object storage (S3 conditional writes) or another fsspec filesystem."""

    def __init__(self, url: str):
        from .fs import filesystem

        self.fs, self.path = filesystem(url)  # with the run's storage options (moe_ray.fs)
        self.s3 = type(self.fs).__name__ == "S3FileSystem"
        self.gcs = not self.s3 and bool({"gs", "gcs"} & set(_protocols(self.fs)))

    # GCS: every step conditional on the object's generation (`ifGenerationMatch`; 0: no object yet)
    def _gcs_object(self) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(self.path)
        return bucket, key

    def _gcs_read(self) -> tuple[dict | None, Any]:
        bucket, key = self._gcs_object()
        for _ in range(5):
            try:
                meta = self.fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True)
            except FileNotFoundError:
                return None, None
            try:
                _, raw = self.fs.call("GET", "b/{}/o/{}", bucket, key, alt="media", generation=meta["generation"])
            except FileNotFoundError:
                continue  # replaced (or removed) between the two requests: look again
            return _parse(raw), str(meta["generation"])
        return None, None

    def _gcs_upload(self, data: bytes, generation: str) -> str | None:
        """Upload `data` if the object's generation is `generation` (0: absent); its new generation,
        or None if the precondition failed."""
        from urllib.parse import quote

        bucket, key = self._gcs_object()
        body = (b'--==0==\nContent-Type: application/json; charset=UTF-8\n\n' + json.dumps({"name": key}).encode()
                + b"\n--==0==\nContent-Type: application/json\n\n" + data + b"\n--==0==--")
        try:  # a multipart upload, as gcsfs's own pipe_file, with the precondition
            out = self.fs.call("POST", f"{self.fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                               uploadType="multipart", ifGenerationMatch=generation, data=body, json_out=True,
                               headers={"Content-Type": 'multipart/related; boundary="==0=="'})
        except FileExistsError:  # gcsfs's name for 412 Precondition Failed
            return None
        except Exception as exc:
            if _precondition_failed(exc):
                return None
            raise
        return str(out["generation"])

    def read(self) -> tuple[dict | None, Any]:
        if self.gcs:
            return self._gcs_read()
        if self.s3:
            bucket, key, _ = self.fs.split_path(self.path)
            try:
                out = self.fs.call_s3("get_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                return None, None
            return _parse(_read_body(self.fs, out["Body"])), out.get("ETag")
        try:
            raw = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        return _parse(raw), raw

    def create(self, data: bytes, parents: bool = True) -> bool:
        if self.gcs:
            return self._gcs_upload(data, "0") is not None
        if self.s3:
            bucket, key, _ = self.fs.split_path(self.path)
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except Exception as exc:
                if _precondition_failed(exc):
                    return False
                raise
        try:
            self.fs.pipe_file(self.path, data, mode="create")
            return True
        except FileExistsError:
            return False

    def remove_if(self, version: Any) -> bool:
        if self.gcs:
            bucket, key = self._gcs_object()
            try:
                self.fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=version)
                return True
            except (FileNotFoundError, FileExistsError):
                return False
            except Exception as exc:
                if _precondition_failed(exc):
                    return False
                raise
        if self.s3:
            bucket, key, _ = self.fs.split_path(self.path)
            try:
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
                return True
            except FileNotFoundError:
                return False
            except Exception as exc:
                if _precondition_failed(exc):
                    return False
                raise
        if self.read()[1] != version:
            return False
        self.fs.rm_file(self.path)
        return True

    def swap(self, data: bytes, version: Any) -> Any:
        """Replace the document `version` by `data` in one conditional write (GCS: `ifGenerationMatch`);
        its new version, or None (not this document any more, or no such write here: `remove_if`)."""
        return self._gcs_upload(data, version) if self.gcs else None

    def replace(self, data: bytes, version: Any) -> Any:
        if self.gcs:
            return self._gcs_upload(data, version)
        if self.s3:
            bucket, key, _ = self.fs.split_path(self.path)
            out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=version)
            return out.get("ETag")
        self.fs.pipe_file(self.path, data)
        return data


def _protocols(fs) -> tuple[str, ...]:
    protocol = getattr(fs, "protocol", ())
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _read_body(fs, body) -> bytes:
    from fsspec.asyn import sync

    async def read() -> bytes:
        async with body as stream:
            return await stream.read()

    return sync(fs.loop, read)


def _precondition_failed(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc} {getattr(exc, '__cause__', '')}"
    return "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text


def _parse(raw: bytes | None) -> dict | None:
    try:
        doc = json.loads(raw or b"")
    except (ValueError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _backend(url: str):
    if "://" in url and not url.startswith("file://"):
        return _Fsspec(url)
    return _Local(url.removeprefix("file://"))


def intervals(doc: dict) -> tuple[float, float]:
    """(heartbeat interval, expiry) in seconds that the lease document states (the legacy ones if it
    states none); an expiry shorter than two heartbeats is taken as two heartbeats."""
    try:
        beat = float(doc.get("heartbeat_s", LEGACY_HEARTBEAT_S))
        stale = float(doc.get("stale_after_s", LEGACY_STALE_S))
    except (TypeError, ValueError):
        beat, stale = LEGACY_HEARTBEAT_S, LEGACY_STALE_S
    beat = beat if beat > 0 else LEGACY_HEARTBEAT_S
    return beat, max(stale, 2 * beat)


def holder_text(doc: dict) -> str:
    """`moe-ray run by alice@node1 (pid 4242), heartbeat 3s ago`."""
    age = _now() - float(doc.get("heartbeat", 0) or 0)
    return (f"{doc.get('command', 'a moe-ray command')} by {doc.get('owner', '?')} (pid {doc.get('pid', '?')}), "
            f"heartbeat {age:.0f}s ago")


def _same_host_reason(doc: dict) -> str | None:
    """Why the holder of `doc`, on this host, is dead (None: alive, or on another host)."""
    if doc.get("host") != socket.gethostname():
        return None
    started = _started(int(doc.get("pid", -1)))
    if started is None:
        return f"its process {doc.get('pid')} is gone"
    if abs(started - float(doc.get("pid_started", 0))) > 1.0:
        return f"its process {doc.get('pid')} is gone (the pid is another process's now)"
    return None


def stale_reason(doc: dict) -> str | None:
    """Why the holder of `doc` is dead, as far as one look tells (None: it may be alive): its pid on
    this host, its heartbeat's age by the wall clock elsewhere (`Lease.acquire` watches, rather)."""
    if not doc:
        return "the lease document is unreadable"
    why = _same_host_reason(doc)
    if why is not None:
        return why
    age = _now() - float(doc.get("heartbeat", 0) or 0)
    _, stale = intervals(doc)
    if age > stale:
        return f"its heartbeat is {age:.0f}s old (its lease expires {stale:.0f}s after one)"
    return None


def _stop_this_process(why: str) -> None:
    """What a holder does on finding its lease taken over: say so and stop, so that it never writes on
    beside the new holder. In moe-ray's commands, SIGTERM to its main thread (a real signal: it also ends a
    blocking call), handled as any SIGTERM (`moe_ray.interrupt`: the work unwinds, exit 143). Called from
    Python (`moe_ray.run` in a notebook), where a SIGTERM would meet Ray's handler and end the caller's
    process: SIGINT instead, as if the user pressed Ctrl-C (a KeyboardInterrupt where Python handles it), so
    that only the run stops."""
    print(f"moe-ray: error: {why}; stopping", file=sys.stderr, flush=True)
    handled_as_ctrl_c = not interrupt.handling() and callable(signal.getsignal(signal.SIGINT))
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT if handled_as_ctrl_c else signal.SIGTERM)


def _note(line: str) -> None:
    print(f"moe-ray: {line}", file=sys.stderr, flush=True)


class Lease:
    """`with Lease(url, "moe-ray run"):` holds the lease on `url` (a store or an output directory)
    for the block, renewing its heartbeat; a second writer gets LeaseHeld naming the holder."""

    def __init__(self, url: str, command: str, note: Callable[[str], None] = _note,
                 on_lost: Callable[[str], None] = _stop_this_process):
        self.url = str(url).rstrip("/")
        self.lease_url = self.url + SUFFIX
        self.command = command
        self.token = secrets.token_hex(8)
        self._backend = _backend(self.lease_url)
        self._version: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._note = note
        self._on_lost = on_lost
        self.took_over: str | None = None
        """Why a stale lease was taken over (None: there was none)."""
        self.lost: str | None = None
        """Set (and `on_lost` called) if this holder finds its lease taken over by another writer."""

    def _document(self) -> bytes:
        pid = os.getpid()
        host = socket.gethostname()
        return json.dumps({
            "owner": f"{_user()}@{host}", "host": host, "pid": pid, "pid_started": _started(pid),
            "command": self.command, "token": self.token,
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "heartbeat": _now(), "heartbeat_s": HEARTBEAT_S, "stale_after_s": STALE_S}).encode()

    def acquire(self) -> "Lease":
        for _ in range(5):
            data = self._document()
            if self._backend.create(data):
                self._version = data
                if isinstance(self._backend, _Fsspec) and (self._backend.s3 or self._backend.gcs):
                    self._version = self._backend.read()[1]
                self._start_heartbeat()
                return self
            doc, version = self._backend.read()
            if doc is None:
                continue  # released in between: try again
            why = self._dead(doc, version)
            if why is None:
                _, stale = intervals(doc)
                raise LeaseHeld(f"{self.url} is being written by {holder_text(doc)}; wait for it to finish "
                                f"(or stop it), or choose another path (a holder that dies loses the lease "
                                f"{stale:.0f}s after its last heartbeat)")
            if why == "":
                continue  # the document changed hands (released, taken): look again
            swapped = self._backend.swap(self._document(), version)  # in one conditional write, where there is one
            if swapped is not None:
                self._version = swapped
                self.took_over = f"took over the lease of {holder_text(doc)}: {why}"
                self._start_heartbeat()
                return self
            if self._backend.remove_if(version):
                self.took_over = f"took over the lease of {holder_text(doc)}: {why}"
        raise LeaseHeld(f"{self.url}: could not take its lease ({self.lease_url}), other writers keep taking it")

    def _dead(self, doc: dict, version: Any) -> str | None:
        """Why the holder of `doc` (read as `version`) is dead; None if it is alive; "" if the document
        was replaced by another holder's meanwhile. A holder on another host is watched: alive as soon
        as its document changes, dead once it has not for its expiry (or for CONFIRM_BEATS heartbeats
        when its heartbeat is already older than that by the wall clock)."""
        if not doc:
            return "the lease document is unreadable"
        if doc.get("host") == socket.gethostname():
            return _same_host_reason(doc)
        beat, stale = intervals(doc)
        age = _now() - float(doc.get("heartbeat", 0) or 0)
        window = min(stale, CONFIRM_BEATS * beat) if age > stale else stale
        self._note(f"{self.url} is held by {holder_text(doc)}, on another host: watching its heartbeat for up "
                   f"to {window:.0f}s (it renews every {beat:g}s) before taking the lease over")
        deadline = time.monotonic() + window
        while True:
            time.sleep(min(beat / 4, max(0.0, deadline - time.monotonic())))
            now, current = self._backend.read()
            if now is None or (now.get("token") != doc.get("token")):
                return ""
            if current != version:
                return None  # it renewed: alive
            if time.monotonic() >= deadline:
                return f"no heartbeat for {window:.0f}s on host {doc.get('host')} (its lease expires {stale:.0f}s " \
                       "after one)"

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="moe-ray lease heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                doc, version = self._backend.read()
                if doc is None and not self._stop.is_set():
                    # gone: a taker that judged another version stale moves it aside and back, or a user
                    # removed it; ours again if nobody else's is there
                    if self._backend.create(self._document(), parents=False):  # not into a deleted folder
                        self._version = self._backend.read()[1]
                        continue
                    doc, version = self._backend.read()
                if doc is not None and doc.get("token") != self.token:
                    if self._stop.is_set():
                        return  # released meanwhile
                    self.lost = f"lost the lease on {self.url}: {holder_text(doc)} took it over"
                    self._on_lost(self.lost)
                    return  # taken over (this process was judged dead): nothing of ours to renew
                if doc is None:
                    continue
                doc["heartbeat"] = _now()
                self._version = self._backend.replace(json.dumps(doc).encode(), version) or self._version
            except Exception:
                continue  # a missed beat; the next one tries again

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            doc, version = self._backend.read()
            if doc and doc.get("token") == self.token:
                self._backend.remove_if(version)
        except Exception:
            pass  # a lease left behind is stale once this process is gone

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_outputs: dict[str, Lease] = {}
_outputs_lock = threading.Lock()


def hold_output(path: "str | os.PathLike", command: str) -> None:
    """Take the lease on output directory `path` for `command` (`plot --out`, `make-tiny --out`)
    until `release_output(path)`, called when its output is complete, or this process ends. A lease
    this process already holds on `path` (a call that failed before finishing) is given up first."""
    key = os.path.abspath(os.fspath(path))
    with _outputs_lock:
        old = _outputs.pop(key, None)
    if old is not None:
        old.release()
    lease = Lease(key, command).acquire()
    with _outputs_lock:
        _outputs[key] = lease


def release_output(path: "str | os.PathLike") -> None:
    """Give up the lease `hold_output` took on `path` (nothing if none is held)."""
    with _outputs_lock:
        lease = _outputs.pop(os.path.abspath(os.fspath(path)), None)
    if lease is not None:
        lease.release()


def refuse_if_held(url: str) -> None:
    """LeaseHeld, naming the holder, if a live writer holds `url` now (for commands that would
    start one, such as `submit`, to refuse before they do)."""
    doc = holder(url)
    if doc is not None:
        raise LeaseHeld(f"{str(url).rstrip('/')} is being written by {holder_text(doc)}; wait for it to finish "
                        "(or stop it), or choose another path")


def holder(url: str) -> dict | None:
    """The lease document on `url` while a live writer holds it, else None."""
    doc, _ = _backend(str(url).rstrip("/") + SUFFIX).read()
    if doc is None or stale_reason(doc) is not None:
        return None
    return doc


__all__ = ["HEARTBEAT_S", "Lease", "LeaseHeld", "STALE_S", "hold_output", "holder", "holder_text", "intervals",
           "refuse_if_held", "release_output", "stale_reason"]
