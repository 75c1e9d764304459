"""SIGINT and SIGTERM for moe-ray's commands and job entrypoint: one line, then exit 130 / 143.

Inside `handling_signals(describe)` both signals raise `Interrupted` (a KeyboardInterrupt, so
`except Exception` cleanups do not swallow it) in the main thread; the unwinding cancels tasks and
kills shard actors, and the caller exits with `exit_status()`. `describe(signal name)` is taken
when the signal comes (what finished, what did not, the command that resumes) and printed on
stderr by `emit()` once the work has unwound, or `EMIT_WITHIN_S` after the signal at the latest.

`ray.init` installs its own SIGTERM handler (exit at once) and Ray's core worker a native one that
dumps a stack trace; `reassert()`, called after connecting, puts ours back where one is active. A
library user calling `moe_ray.run` outside these commands keeps their own handlers.
"""
from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The process got SIGINT or SIGTERM. A KeyboardInterrupt, because Ray's blocking calls turn
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
    """The shell's status for the signal that interrupted this process: 128 + SIGTERM's 15 = 143, or
    130 for SIGINT (and for a KeyboardInterrupt that no handled signal explains)."""
    return 128 + (_received[-1] if _received else signal.SIGINT)


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


def _install() -> None:
    for signum in SIGNALS:
        signal.signal(signum, _handler)


@contextmanager
def handling_signals(describe: Callable[[str], str]) -> Iterator[None]:
    """SIGINT and SIGTERM print `describe(signal name)` and raise `Interrupted` while this is open
    (main thread only; elsewhere nothing changes)."""
    global _describe
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    _describe = describe
    _received.clear()
    _install()
    try:
        yield
    finally:
        _describe = None
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


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


__all__ = ["Interrupted", "emit", "exit_status", "handling_signals", "progress_line", "reassert"]
