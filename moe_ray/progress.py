"""Everything moe-ray tells a user while work goes on: step lines and progress counters.

One module owns it, so a terminal, a pipe and a submitted job's log each get what suits them:
- a terminal (stderr is a tty): tqdm bars, redrawn in place;
- anything else (a Ray job's log file, a pipe, a CI log): plain lines, one each time a counter
  crosses another `STEP_PERCENT` percent (or `QUIET_S` seconds have passed), and one when it ends;
  no carriage-return redraws and no blank lines, so a log reads top to bottom.

`step(line)` says what the program is doing now (connecting, planning); `counter(...)` counts units,
tokens, sequences or figures. Both are silent with `enabled=False` (`--no-progress`); results and
errors are never printed through here.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

STEP_PERCENT = 10
"""A plain (non-terminal) counter prints a line each time it crosses another 10 % ..."""
QUIET_S = 60.0
"""... or after this long without a line while it moved (long units: a line a minute at most)."""
PREFIX = "moe-ray: "


def on_terminal(stream: TextIO | None = None) -> bool:
    """Whether bars can be redrawn in place: the stream (stderr by default) is a terminal."""
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def step(line: str, enabled: bool = True) -> None:
    """One line saying what is being done now ('connecting to ...', 'planning ...'), on stdout."""
    if enabled:
        print(PREFIX + line, flush=True)


class Counter:
    """Progress of one long step: `update(n)`, `note(line)` for an event beside it, `close()`.

    On a terminal a tqdm bar on stderr; elsewhere plain lines on stdout such as
    `moe-ray: static units: 2/4 unit (50%, 3.1 s)`."""

    def __init__(self, total: int, what: str, unit: str = "unit", enabled: bool = True,
                 terminal: bool | None = None, position: int | None = None):
        self.total, self.what, self.unit, self.enabled = max(0, int(total)), what, unit, enabled
        self.done = 0
        self._started = self._last_line = time.monotonic()
        self._next_percent = STEP_PERCENT
        self._closed = False
        self._bar = None
        if enabled and (on_terminal() if terminal is None else terminal):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=what, unit=unit, dynamic_ncols=True, position=position,
                             leave=True, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        """Count `n` more done."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if not self.enabled or not self.total:
            return
        percent = 100 * self.done / self.total
        now = time.monotonic()
        if self.done >= self.total:
            return  # close() prints the last line
        if percent >= self._next_percent or now - self._last_line >= QUIET_S:
            while self._next_percent <= percent:
                self._next_percent += STEP_PERCENT
            self._line(now)

    def note(self, line: str) -> None:
        """An event beside the counter (a warning, a node lost), as one line that does not break a bar."""
        if self._bar is not None:
            self._bar.write(PREFIX + line, file=sys.stderr)
        else:
            print(PREFIX + line, flush=True)

    def _line(self, now: float) -> None:
        self._last_line = now
        percent = 100 * self.done / self.total if self.total else 100
        print(f"{PREFIX}{self.what}: {self.done}/{self.total} {self.unit} ({percent:.0f}%, "
              f"{now - self._started:.1f} s)", flush=True)

    def close(self) -> None:
        """End the counter: the bar stays on the terminal; a plain counter says where it ended."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.total:
            self._line(time.monotonic())

    def __enter__(self) -> "Counter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardCounters:
    """Progress of a layer-shard pipeline (`distributed.pipeline.run_pipeline`'s `on_step`): one
    counter per shard, each counting the `unit`s (tokens) of the items that shard has finished."""

    def __init__(self, labels: "list[str]", sizes: "dict[str, int]", unit: str, enabled: bool = True):
        total = sum(sizes.values())
        self.sizes = sizes
        self.counters = [Counter(total, label, unit, enabled, position=i) for i, label in enumerate(labels)]

    def __call__(self, shard: int, name: str) -> None:
        self.counters[shard].update(self.sizes.get(name, 0))

    def close(self) -> None:
        for c in self.counters:
            c.close()


class Callback:
    """A counter for work whose total is known only once it starts (`render`'s `on_figure(done, total,
    name)`): called with (done, total, ...), it opens its counter on the first call."""

    def __init__(self, what: str, unit: str = "unit", enabled: bool = True):
        self.what, self.unit, self.enabled = what, unit, enabled
        self.counter: Counter | None = None
        self._started = time.monotonic()

    def __call__(self, done: int, total: int, *_: object) -> None:
        if self.counter is None:
            self.counter = Counter(total, self.what, self.unit, self.enabled)
            self.counter._started = self._started  # time counts from the start of the work
        self.counter.update(done - self.counter.done)

    def close(self) -> None:
        if self.counter is not None:
            self.counter.close()


def counter(total: int, what: str, unit: str = "unit", enabled: bool = True, position: int | None = None) -> Counter:
    """A progress counter for `total` `unit`s of `what` (see `Counter`)."""
    return Counter(total, what, unit, enabled, position=position)


__all__ = ["Callback", "Counter", "ShardCounters", "counter", "on_terminal", "step"]
