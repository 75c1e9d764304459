"""SIGINT, SIGTERM and SIGHUP for moe-ray's commands and job entrypoint: one line, then exit 130 / 143 /
129.

Inside `handling_signals(describe)` the three signals raise `Interrupted` (a KeyboardInterrupt, so
`except Exception` cleanups do not swallow it) in the main thread; the unwinding cancels tasks and
kills shard actors, and the caller exits with `exit_status()`. `describe(signal name)` is taken
when the signal comes (what finished, what did not, the command that resumes) and printed on
stderr by `emit()` once the work has unwound, or `EMIT_WITHIN_S` after the signal at the latest.

`ray.init` installs its own SIGTERM handler (exit at once) and Ray's core worker a native one that
dumps a stack trace; `reassert()`, called after connecting, puts ours back where one is active. A
library user calling `moe_ray.run` outside these commands keeps their own handlers.

A Python signal handler runs only when the main thread runs Python. A SIGTERM to the whole process
group also ends Ray's GCS and raylet, and the main thread can then sit for a minute inside one of
Ray's calls (exporting a function, cancelling a task) retrying the dead GCS, so the handler never
runs. A watchdog thread therefore hears every handled signal through Python's wakeup fd; if the
process is still there `FORCE_EXIT_AFTER_S` after the signal, it records the interruption (the
callbacks registered with `on_forced_exit`: the run marks its store), prints the line and ends the
process with the signal's status.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Ctrl-C; `kill` or a process manager; the terminal closing (an ssh session dropped): each ends the
work the same way and records it in the store."""


class Interrupted(KeyboardInterrupt):
    """The process got SIGINT, SIGTERM or SIGHUP. A KeyboardInterrupt, because Ray's blocking calls turn
    whatever a signal handler raises into a plain KeyboardInterrupt (other exceptions into a
    SystemError): catch KeyboardInterrupt and ask `exit_status()`."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


_describe: Callable[[str], str] | None = None
_received: list[int] = []
_pending_line: list[str] = []
_lock = threading.Lock()
EMIT_WITHIN_S = 2.0
"""The line is printed once the interrupted work has unwound (so it is the last thing on the
terminal, after the progress bars close), or after this long, whichever comes first: a stopped Ray
job is SIGKILLed 3 s after its SIGTERM."""


def emit() -> None:
    """Print the interruption's line, once (the main thread after unwinding, or the timer); a
    KeyboardInterrupt that came without a handled signal gets a plain one."""
    with _lock:
        lines, _pending_line[:] = list(_pending_line), []
        if not lines and not _received:
            lines = ["moe-ray: interrupted; rerun the same command to resume"]
            _received.append(signal.SIGINT)
    for line in lines:
        print(line, file=sys.stderr, flush=True)


def exit_status() -> int:
    """The shell's status for the signal that interrupted this process: 128 + SIGTERM's 15 = 143,
    128 + SIGHUP's 1 = 129, or 130 for SIGINT (and for a KeyboardInterrupt that no handled signal explains)."""
    return 128 + (_received[-1] if _received else signal.SIGINT)


def received() -> str | None:
    """The name of the last signal `handling_signals` caught (SIGTERM, ...), or None: a plain
    KeyboardInterrupt out of Ray's blocking calls may be one of ours in disguise."""
    return signal.Signals(_received[-1]).name if _received else None


def _handler(signum: int, frame) -> None:
    global _describe
    _received.append(signum)
    describe, _describe = _describe, None  # a second signal while unwinding: no second line
    if describe is not None:
        name = signal.Signals(signum).name
        try:
            line = describe(name)
        except Exception as exc:  # the line must not fail the interruption
            line = f"moe-ray: interrupted by {name} ({type(exc).__name__} while summarising)"
        with _lock:
            _pending_line[:] = [line]
        timer = threading.Timer(EMIT_WITHIN_S, emit)
        timer.daemon = True
        timer.start()
    raise Interrupted(signum)


FORCE_EXIT_AFTER_S = 3.5
"""How long after a signal the main thread has to unwind before the watchdog ends the process itself
(a process group's SIGTERM must end `moe-ray run` within 5 s, its Ray workers included)."""

_forced_exit_callbacks: list[Callable[[str], None]] = []


def on_forced_exit(callback: Callable[[str], None]) -> Callable[[], None]:
    """Until the returned function is called, `callback(signal name)` is called if the watchdog has to
    end the process (the main thread did not unwind in time): what the unwinding would have recorded,
    recorded anyway."""
    _forced_exit_callbacks.append(callback)
    return lambda: _forced_exit_callbacks.remove(callback) if callback in _forced_exit_callbacks else None


def _force_exit(signum: int) -> None:
    """End the process for `signum` now: the line (taken here if the handler never ran), the
    interruption recorded, exit status 128 + signum, without waiting on anything else."""
    name = signal.Signals(signum).name
    with _lock:
        handled = bool(_received)
        if not handled:
            _received.append(signum)
    describe = _describe
    if not handled and describe is not None:
        try:
            line = describe(name)
        except Exception as exc:
            line = f"moe-ray: interrupted by {name} ({type(exc).__name__} while summarising)"
        with _lock:
            _pending_line[:] = [line]
    for callback in list(_forced_exit_callbacks):
        try:
            callback(name)
        except Exception:
            pass
    emit()
    os._exit(exit_status())


class _Watchdog:
    """A daemon thread woken by every handled signal (through `signal.set_wakeup_fd`, which the C-level
    handler writes even while the main thread is stuck outside Python): `_force_exit` if the process
    has not ended `FORCE_EXIT_AFTER_S` after the first one. Disarmed when the work ends without a
    signal; after a signal it stays armed through the process's exit (Ray's shutdown with a dead GCS)."""

    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._disarmed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="moe-ray signal watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        ours = {int(s) for s in SIGNALS}
        try:
            while True:
                data = os.read(self._read, 64)
                if not data:
                    return
                got = [b for b in data if b in ours]
                if got:
                    if not self._disarmed.wait(FORCE_EXIT_AFTER_S):
                        _force_exit(got[0])
                    return
        except OSError:
            return
        finally:
            os.close(self._read)

    def close(self, signalled: bool) -> None:
        """Give the wakeup fd back; disarm unless a signal came (then the deadline stands)."""
        signal.set_wakeup_fd(self._previous)
        if not signalled:
            self._disarmed.set()
        os.close(self._write)  # the thread's read ends (after its deadline, if it is counting one)


def _install() -> None:
    for signum in SIGNALS:
        signal.signal(signum, _handler)


@contextmanager
def handling_signals(describe: Callable[[str], str]) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP print `describe(signal name)` and raise `Interrupted` while this is open
    (main thread only; elsewhere nothing changes)."""
    global _describe
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    _describe = describe
    _received.clear()
    _install()
    watchdog = _Watchdog()
    try:
        yield
    finally:
        _describe = None
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        watchdog.close(signalled=bool(_received))


def handling() -> bool:
    """Whether moe-ray's handlers are open (`handling_signals`: a command or the job entrypoint), so that a
    SIGTERM to this process unwinds the work with one line rather than ending it at once (Ray's handler)."""
    return _describe is not None


def reassert() -> None:
    """Put moe-ray's handlers back (after `ray.init` replaced SIGTERM's) if `handling_signals` is open."""
    if _describe is not None and threading.current_thread() is threading.main_thread():
        _install()


def progress_line(signame: str, store: str, resume: str, analyses: Sequence[str] | None = None) -> str:
    """One line from the store's done flags: 'moe-ray: interrupted by SIGTERM. Finished: static (4/4
    units). Not finished: reorder (2/6 units), dynamic (2/8 units, an unfinished input starts over).
    Finished units stay in STORE; resume with: RESUME'."""
    from .store import store_progress

    counts = store_progress(store, analyses) if store else {}
    if not counts:
        return f"moe-ray: interrupted by {signame} before any unit was computed; run again with: {resume}"

    def state(analysis: str, done: int, total: int) -> str:
        again = ", an unfinished input starts over" if analysis == "dynamic" and done else ""
        return f"{analysis} ({done}/{total} units{again})"

    finished = [state(a, d, t) for a, (d, t) in counts.items() if d == t]
    unfinished = [state(a, d, t) for a, (d, t) in counts.items() if d < t]
    return (f"moe-ray: interrupted by {signame}. Finished: {', '.join(finished) or 'nothing'}. "
            f"Not finished: {', '.join(unfinished) or 'nothing'}. Finished units stay in {store}; "
            f"resume with: {resume}")


__all__ = ["FORCE_EXIT_AFTER_S", "Interrupted", "emit", "exit_status", "handling_signals", "on_forced_exit",
           "progress_line", "reassert", "received"]
