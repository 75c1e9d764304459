"""Ray's own messages on the driver's terminal, one line per event; the full text in a log file.

A driver connected with `log_to_driver` prints every error event Ray publishes: a dead raylet comes
with the last 20 lines of its state dump, a node marked dead with a paragraph of possible causes,
each failed attempt of a task with its retry count. Those are kept, whole, in
`<Ray session>/logs/moe-ray-driver-<pid>.log` on the driver's node (named once on the terminal),
and the terminal gets each event's first line, shortened. Output of the tasks and actors themselves
(worker stdout/stderr) stays in Ray's worker log files: moe-ray connects with `log_to_driver=False`.

Ray has no public hook for this: the driver's log threads print through
`ray._private.worker.print_to_stdstream`, which is wrapped here; if a Ray release renames it,
nothing is shortened (and a debug message says so).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("moe_ray")

LINE_CHARS = 200


def _log_path() -> Path:
    try:
        import ray._private.worker as worker

        logs = Path(worker._global_node.get_logs_dir_path())
    except Exception:
        import tempfile

        logs = Path(tempfile.gettempdir())
    return logs / f"moe-ray-driver-{os.getpid()}.log"


def one_line(text: str) -> str:
    """An event's first non-empty line, at most LINE_CHARS characters."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first if len(first) <= LINE_CHARS else first[: LINE_CHARS - 1] + "…"


class _Shortener:
    def __init__(self, original):
        self.original = original
        self.lock = threading.Lock()
        self.named: set[Path] = set()

    def __call__(self, data: dict, ignore_prefix: bool) -> None:
        # the autoscaler's messages are one line per event already, after Ray's own filtering
        if data.get("pid") != "raylet":
            return self.original(data, ignore_prefix)
        lines = [str(line) for line in data.get("lines", [])]
        path = _log_path()
        with self.lock:
            try:
                with open(path, "a") as f:
                    for text in lines:
                        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({data.get('pid')})\n{text}\n\n")
            except OSError:
                log.debug("cannot write %s", path, exc_info=True)
            short = [one_line(text) for text in lines]
            if short and path not in self.named:
                self.named.add(path)
                short[0] += f" [Ray's messages are shortened to one line; full text in {path}]"
        self.original({**data, "lines": short}, ignore_prefix)


def shorten_ray_events() -> None:
    """Route the connected driver's Ray event messages through the shortener (once per process)."""
    try:
        import ray._private.worker as worker

        current = worker.print_to_stdstream
    except (ImportError, AttributeError):
        log.debug("Ray's print_to_stdstream not found: its messages are printed whole")
        return
    if not isinstance(current, _Shortener):
        worker.print_to_stdstream = _Shortener(current)


__all__ = ["one_line", "shorten_ray_events"]
