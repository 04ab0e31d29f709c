"""Live job progress for the command line.

:func:`follow` feeds a job's Watch stream (:meth:`qscale.Job.watch`) into a *view* until the job
is final, and watches again when the coordinator goes away (a restart), waiting for the channel to
reconnect (gRPC's own backoff, see :mod:`qscale.rpc`).
Three views render the updates:

- :class:`BarView`: a rich live display for a terminal: a bar with shots done of total, shards
  done of total, shards running (nodes used once the job is over), shots per second and ETA,
  and below it the most frequent outcomes so far of the first circuits.
- :class:`JsonLinesView`: one compact JSON object per update (JSON Lines), the last one with
  the final state.
- :class:`PlainView`: a plain line now and then (first update, state changes, every
  ``interval`` seconds) and one at the end, for logs and pipes.

Every view is a context manager and gets ``update`` for each non-final update, ``reconnecting``
while the coordinator is away, and ``finish`` once with the final update.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Any, Protocol

from qscale.errors import JobTimeoutError, UnavailableError
from qscale.results import JobState, JobStatus, Progress

if TYPE_CHECKING:
    from collections.abc import Iterator

    from rich.console import Console, RenderableType
    from rich.live import Live

__all__ = ["BarView", "JsonLinesView", "PlainView", "ProgressView", "QuietView", "RateMeter", "follow", "format_duration",
           "percent_done"]

# ----------------------------------------------------------------- numbers

class RateMeter:
    """Shots per second over the last ``window_s`` seconds of updates, and the time left.

    ``clock`` is :func:`time.monotonic` unless a test injects another.
    """

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, shots_done: int, now: float | None = None) -> None:
        """Record that ``shots_done`` shots were done at ``now`` (default: the clock)."""
        now = self.clock() if now is None else now
        if self._samples and shots_done < self._samples[-1][1]:
            self._samples.clear()  # counted shots went back: start measuring afresh
        self._samples.append((now, shots_done))
        # Keep the newest sample older than the window, so the span covers the whole window.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()

    def rate(self) -> float | None:
        """Shots per second, or None until two samples at least 0.2 s apart have been seen."""
        if len(self._samples) < 2:
            return None
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        if t1 - t0 < 0.2:
            return None
        return (s1 - s0) / (t1 - t0)

    def eta(self, shots_done: int, shots_total: int) -> float | None:
        """Seconds until ``shots_total`` at the current rate; None while the rate is unknown or 0."""
        if shots_done >= shots_total:
            return 0.0
        rate = self.rate()
        if not rate or rate <= 0:
            return None
        return (shots_total - shots_done) / rate


def percent_done(status: JobStatus) -> float:
    """Shots done as a percentage of the total (100 for a done job without shots)."""
    if status.shots_total > 0:
        return min(100.0, 100.0 * status.shots_done / status.shots_total)
    return 100.0 if status.state == JobState.DONE else 0.0


def format_duration(seconds: float | None) -> str:
    """``0:00:42``-style hours, minutes and seconds; ``-:--:--`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-:--:--"
    total = max(0, int(round(seconds)))
    return f"{total // 3600}:{total // 60 % 60:02d}:{total % 60:02d}"


def format_rate(rate: float | None) -> str:
    """``1,234 shots/s``; ``- shots/s`` when unknown."""
    if rate is None:
        return "- shots/s"
    return f"{rate:,.0f} shots/s" if rate >= 10 else f"{rate:.1f} shots/s"


def wall_time(status: JobStatus) -> float | None:
    """Seconds from submission to the final state, by the coordinator's clock; None until final."""
    if not status.state.final or not status.finished_at:
        return None
    return max(0.0, status.finished_at - status.created_at)


def _short(outcome: str, width: int = 40) -> str:
    """A long bitstring with its middle elided, so both ends stay readable."""
    if len(outcome) <= width:
        return outcome
    keep = (width - 1) // 2
    return outcome[:keep] + "…" + outcome[-keep:]


def _top(counts: dict[str, int], n: int) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


# ------------------------------------------------------------------ follow

class ProgressView(Protocol):
    """What :func:`follow` drives; a context manager around the whole watch."""

    def __enter__(self) -> ProgressView: ...

    def __exit__(self, *exc: object) -> None: ...

    def update(self, progress: Progress) -> None:
        """A non-final update."""

    def reconnecting(self, attempt: int, error: Exception) -> None:
        """The stream broke (the coordinator is away, ``attempt`` times in a row): :func:`follow`
        now waits for it to come back."""

    def finish(self, progress: Progress, nodes_used: Sequence[str] | None = None) -> None:
        """The final update, with the nodes that ran the job when known."""


class QuietView:
    """A view that draws nothing: :meth:`qscale.Job.wait` follows a job with it."""

    def update(self, progress: Progress) -> None:
        """Nothing to draw."""

    def reconnecting(self, attempt: int, error: Exception) -> None:
        """Nothing to say."""

    def finish(self, progress: Progress, nodes_used: Sequence[str] | None = None) -> None:
        """Nothing to draw."""


class _Watchable(Protocol):
    job_id: str

    def watch(self, *, counts: bool = ..., max_outcomes: int = ..., timeout: float | None = ...,
              wait_for_ready: bool = ...) -> Iterator[Progress]: ...


def follow(job: _Watchable, view: ProgressView, *, top: int = 5, timeout: float | None = None,
           clock: Callable[[], float] = time.monotonic) -> Progress:
    """Feed ``job.watch()`` into ``view`` until the job is final; returns the final update.

    The final update is *not* passed to the view: the caller calls ``view.finish`` (after
    fetching, say, the nodes used). When the stream breaks with
    :class:`~qscale.errors.UnavailableError` (a coordinator restart), ``follow`` tells the view
    (``reconnecting``) and watches again with ``wait_for_ready``: the call waits, within
    ``timeout``, until the channel has reconnected (gRPC's reconnect backoff, see
    :mod:`qscale.rpc`), so nothing here sleeps. ``attempt`` counts the breaks in a row and
    starts over once updates flow again.

    Args:
        job: a :class:`qscale.Job` (or anything with its ``watch`` method).
        view: what renders the updates.
        top: most frequent outcomes per circuit to ask for; 0 asks for no counts.
        timeout: give up after this many seconds (:class:`~qscale.errors.JobTimeoutError`);
            the job goes on.
        clock: injectable for tests.
    """
    deadline = None if timeout is None else clock() + timeout
    attempt = 0
    while True:
        remaining = None if deadline is None else deadline - clock()
        if remaining is not None and remaining <= 1e-3:
            raise JobTimeoutError(f"job {job.job_id} not finished after {timeout}s")
        try:
            for progress in job.watch(counts=top > 0, max_outcomes=max(0, top), timeout=remaining,
                                      wait_for_ready=attempt > 0):
                attempt = 0
                if progress.status.state.final:
                    return progress
                view.update(progress)
            error: Exception = UnavailableError("the progress stream ended before the job did")
        except UnavailableError as exc:
            error = exc
        except JobTimeoutError:
            raise JobTimeoutError(f"job {job.job_id} not finished after {timeout}s") from None
        attempt += 1
        view.reconnecting(attempt, error)


# ------------------------------------------------------------------- views

class _ViewBase:
    """Shared state: the rate meter and the last update."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.meter = RateMeter(clock=clock)
        self.last: Progress | None = None

    def _record(self, progress: Progress) -> None:
        self.last = progress
        self.meter.add(progress.status.shots_done)

    def __enter__(self) -> _ViewBase:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _update_dict(progress: Progress, meter: RateMeter, top: int, final: bool,
                 nodes_used: Sequence[str] | None) -> dict[str, Any]:
    s = progress.status
    data: dict[str, Any] = s.to_dict()
    data["percent"] = round(percent_done(s), 2)
    wall = wall_time(s)
    if final and wall:
        data["rate_shots_per_s"] = round(s.shots_done / wall, 3)
    else:
        rate = meter.rate()
        data["rate_shots_per_s"] = None if rate is None else round(rate, 3)
    eta = 0.0 if final else meter.eta(s.shots_done, s.shots_total)
    data["eta_s"] = None if eta is None else round(eta, 3)
    if top > 0:
        data["top"] = [dict(_top(counts, top)) for counts in progress.counts]
    if final:
        data["wall_time_s"] = wall
        data["nodes_used"] = list(nodes_used) if nodes_used is not None else None
    return data


class JsonLinesView(_ViewBase):
    """One compact JSON object per line (JSON Lines) on ``stream``.

    Each object is the job's status (as ``status --json`` prints it) plus ``percent``,
    ``rate_shots_per_s``, ``eta_s`` (null while unknown) and, with ``top`` > 0, ``top``: per
    circuit the most frequent outcomes so far, most frequent first. Updates come at most every
    ``interval`` seconds (0: every update the coordinator sends); the last line always comes
    and carries the final ``state`` plus ``wall_time_s`` and ``nodes_used`` (null if unknown).
    While the coordinator is away a note goes to stderr, never to ``stream``.
    """

    def __init__(self, stream: IO[str] | None = None, *, top: int = 5, interval: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self.stream = stream if stream is not None else sys.stdout
        self.top = top
        self.interval = interval
        self._printed_at: float | None = None

    def _emit(self, data: dict[str, Any]) -> None:
        self.stream.write(json.dumps(data, separators=(",", ":")) + "\n")
        self.stream.flush()

    def update(self, progress: Progress) -> None:
        self._record(progress)
        now = self.clock()
        if self._printed_at is not None and now - self._printed_at < self.interval:
            return
        self._printed_at = now
        self._emit(_update_dict(progress, self.meter, self.top, False, None))

    def reconnecting(self, attempt: int, error: Exception) -> None:
        if attempt == 1:
            print(f"coordinator unavailable ({error}); reconnecting", file=sys.stderr, flush=True)

    def finish(self, progress: Progress, nodes_used: Sequence[str] | None = None) -> None:
        self._record(progress)
        self._emit(_update_dict(progress, self.meter, self.top, True, nodes_used))


def _plain_line(progress: Progress, meter: RateMeter, final: bool, nodes_used: Sequence[str] | None) -> str:
    s = progress.status
    parts = [f"{s.shots_done:,}/{s.shots_total:,} shots ({percent_done(s):.0f}%)",
             f"{s.shards_done}/{s.shards_total} shards"]
    if final:
        if nodes_used is not None:
            parts.append(f"{len(nodes_used)} node{'s' if len(nodes_used) != 1 else ''}")
        wall = wall_time(s)
        if wall is not None:
            parts.append(f"{wall:.1f} s")
    else:
        parts += [f"{s.shards_running} running", format_rate(meter.rate()),
                  f"ETA {format_duration(meter.eta(s.shots_done, s.shots_total))}"]
    line = f"job {s.job_id} {s.state.value}: " + ", ".join(parts)
    return line + (f"; {s.error}" if s.error else "")


class PlainView(_ViewBase):
    """Plain text lines for pipes and log files: one on the first update, on a change of state
    and at most every ``interval`` seconds otherwise, and one with the final state."""

    def __init__(self, stream: IO[str] | None = None, *, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self.stream = stream if stream is not None else sys.stdout
        self.interval = interval
        self._printed_at: float | None = None
        self._state: JobState | None = None

    def _emit(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def update(self, progress: Progress) -> None:
        self._record(progress)
        now = self.clock()
        changed = progress.status.state != self._state
        self._state = progress.status.state
        if not changed and self._printed_at is not None and now - self._printed_at < self.interval:
            return
        self._printed_at = now
        self._emit(_plain_line(progress, self.meter, False, None))

    def reconnecting(self, attempt: int, error: Exception) -> None:
        if attempt == 1:
            self._emit(f"coordinator unavailable ({error}); reconnecting")

    def finish(self, progress: Progress, nodes_used: Sequence[str] | None = None) -> None:
        self._record(progress)
        self._emit(_plain_line(progress, self.meter, True, nodes_used))


class BarView(_ViewBase):
    """A rich live display for a terminal.

    The first line names the job and its state; the second is the bar with the percentage,
    shots done of total, shards done of total, shards running (nodes used once over), shots per
    second over the last 10 s and the ETA (the wall time once over). Below, with ``top`` > 0,
    the most frequent outcomes so far of the first ``max_circuits`` circuits.

    Args:
        console: where to draw (a terminal).
        top: outcomes per circuit in the table; 0 for no table.
        keep_outcomes: keep the outcome table in the final rendering (``submit --wait`` drops
            it, as it prints the result's own table next).
        max_circuits: circuits shown in the outcome table.
    """

    def __init__(self, console: Console, *, top: int = 5, keep_outcomes: bool = True, max_circuits: int = 4,
                 bar_width: int = 40, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self.console = console
        self.top = top
        self.keep_outcomes = keep_outcomes
        self.max_circuits = max_circuits
        self.bar_width = bar_width
        self.note = ""
        self.final = False
        self.nodes_used: Sequence[str] | None = None
        self._live: Live | None = None

    def __enter__(self) -> BarView:
        from rich.live import Live

        self._live = Live(self.render(), console=self.console, refresh_per_second=8, transient=False)
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            live, self._live = self._live, None
            live.__exit__(None, None, None)  # draws the last rendering once more and shows the cursor

    def _refresh(self, now: bool = False) -> None:
        if self._live is not None:
            self._live.update(self.render(), refresh=now)

    def update(self, progress: Progress) -> None:
        self._record(progress)
        self.note = ""
        self._refresh()

    def reconnecting(self, attempt: int, error: Exception) -> None:
        self.note = f"coordinator unavailable; reconnecting (attempt {attempt})"
        self._refresh(now=True)

    def finish(self, progress: Progress, nodes_used: Sequence[str] | None = None) -> None:
        self._record(progress)
        self.note = ""
        self.final = True
        self.nodes_used = nodes_used
        self._refresh()  # drawn when the display stops

    def render(self) -> RenderableType:
        """What the display shows now."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        if self.last is None:
            return Text("waiting for the coordinator…", style="dim")
        s = self.last.status
        state_style = {JobState.DONE: "green", JobState.FAILED: "red", JobState.CANCELLED: "yellow"}.get(
            s.state, "cyan")
        title = Text.assemble("job ", (s.job_id, "bold"), " ", (s.state.value, state_style))
        if s.error:
            title.append(f": {s.error}", style="red")
        if self.note:
            title.append(f"  ({self.note})", style="yellow")

        row = Table.grid(padding=(0, 2))
        for justify in ("left", "right", "right", "right", "right", "right", "right"):
            row.add_column(justify=justify, no_wrap=True)  # type: ignore[arg-type]
        total = max(1, s.shots_total)
        bar = ProgressBar(total=total, completed=min(total, s.shots_done if s.shots_total else
                                                     (total if s.state == JobState.DONE else 0)),
                          width=self.bar_width)
        shots = f"{s.shots_done:,}/{s.shots_total:,} shots"
        shards = f"{s.shards_done}/{s.shards_total} shards"
        if self.final:
            used = self.nodes_used
            who = f"{len(used)} node{'s' if len(used) != 1 else ''}" if used is not None else ""
            wall = wall_time(s)
            rate = format_rate(s.shots_done / wall if wall else None)
            when = f"{wall:.1f} s" if wall is not None else ""
        else:
            who = f"{s.shards_running} running"
            rate = format_rate(self.meter.rate())
            when = f"ETA {format_duration(self.meter.eta(s.shots_done, s.shots_total))}"
        row.add_row(bar, f"{percent_done(s):3.0f}%", shots, shards, who, rate, when)

        parts: list[RenderableType] = [title, row]
        if self.top > 0 and (self.keep_outcomes or not self.final):
            table = self._outcomes()
            if table is not None:
                parts.append(table)
        return Group(*parts)

    def _outcomes(self) -> RenderableType | None:
        from rich.columns import Columns
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        assert self.last is not None
        tables: list[RenderableType] = []
        for index, counts in enumerate(self.last.counts[: self.max_circuits]):
            if not counts:
                continue
            table = Table(title=f"circuit {index}", title_justify="left", box=None, padding=(0, 1),
                          show_edge=False)
            table.add_column("outcome", style="cyan", no_wrap=True)
            table.add_column("count", justify="right", no_wrap=True)
            for key, value in _top(counts, self.top):
                table.add_row(Text(_short(key)), f"{value:,}")  # Text: never read as markup
            tables.append(table)
        if not tables:
            return None
        more = len(self.last.counts) - self.max_circuits
        columns = Columns(tables, padding=(1, 4))
        if more > 0:
            return Group(columns, Text(f"… and {more} more circuit(s)", style="dim"))
        return columns
