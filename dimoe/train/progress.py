"""Training progress on the driver, readable on a terminal and in a CI log.

On a terminal: one rich bar per stage (steps done / max_steps, the latest loss, elapsed and
remaining time). When stdout is not a terminal (CI, `ray job submit` logs, a Tune trial), a bar
would leave a line of debris per refresh, so the same progress becomes a plain line at most every
`plain_every_s` seconds plus one for the last step.

A Ray Train stage reports to the driver only at checkpoints, so `StageWatch` follows the stage by
polling `logs/train_metrics.jsonl`, which rank 0 appends at every log step. That file is on the
driver's machine on a local cluster, or on shared storage (where checkpoints must be anyway); where
it is not, the bar only moves when the stage ends.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dimoe.io import read_jsonl

PLAIN_EVERY_S = 30.0
POLL_S = 1.0


class StepProgress:
    """Steps done out of `total` with the latest loss: a bar on a terminal, plain lines otherwise,
    nothing when not `enabled`. `update` may be called from another thread."""

    def __init__(
        self,
        label: str,
        total: int,
        *,
        enabled: bool = True,
        console: Console | None = None,
        plain_every_s: float = PLAIN_EVERY_S,
    ) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.console = console or Console()
        self.plain_every_s = plain_every_s
        self.step, self.loss = 0, float("nan")
        self._bar: Progress | None = None
        self._started = self._last_line = time.monotonic()
        self._printed_step = 0
        self._lock = threading.Lock()

    def __enter__(self) -> StepProgress:
        if self.enabled and self.console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("steps  loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TextColumn("<"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._bar.add_task(self.label, total=self.total, loss="-")
            self._bar.start()
        self._started = self._last_line = time.monotonic()
        return self

    def update(self, step: int, loss: float) -> None:
        with self._lock:
            self.step, self.loss = step, loss
            if self._bar is not None:
                self._bar.update(self._task, completed=step, loss=f"{loss:.4f}")
            elif self.enabled and self._line_due(time.monotonic()):
                self._print_line(time.monotonic())

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.enabled and exc_info[0] is None and self.step != self._printed_step:
            self._print_line(time.monotonic())

    def _line_due(self, now: float) -> bool:
        """The first update (the stage is running), then one per interval, and the last step, each
        once (the final report and the log's last record both say it)."""
        if self.step == self._printed_step:
            return False
        first = self._printed_step == 0
        return first or now - self._last_line >= self.plain_every_s or self.step >= self.total

    def _print_line(self, now: float) -> None:
        elapsed = time.strftime("%H:%M:%S", time.gmtime(now - self._started))
        self.console.print(
            f"{self.label}: step {self.step}/{self.total}, loss {self.loss:.4f} ({elapsed} elapsed)",
            highlight=False,
            markup=False,
        )
        self._last_line, self._printed_step = now, self.step


class StageWatch:
    """A stage's progress while `trainer.fit()` blocks the driver: a daemon thread feeds the records
    that appear in `log_dir/train_metrics.jsonl` into a `StepProgress`; `finish` adds the last ones
    and the stage's final report (exact even where the driver cannot read the log)."""

    def __init__(self, log_dir: Path, label: str, total: int, *, enabled: bool = True) -> None:
        self.progress = StepProgress(label, total, enabled=enabled)
        self._tail = _JsonlTail(log_dir / "train_metrics.jsonl")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name=f"progress-{label}", daemon=True)

    def __enter__(self) -> StageWatch:
        self.progress.__enter__()
        if self.progress.enabled:
            self._thread.start()
        return self

    def finish(self, metrics: dict[str, Any]) -> None:
        """After `fit()`: the log's last records, then the final report's step and loss."""
        self._stop_following()
        self._catch_up()
        if "step" in metrics:
            self.progress.update(metrics["step"], metrics.get("loss", float("nan")))

    def __exit__(self, *exc_info: object) -> None:
        self._stop_following()
        self.progress.__exit__(*exc_info)

    def _follow(self) -> None:
        while not self._stop.wait(POLL_S):
            self._catch_up()

    def _catch_up(self) -> None:
        for record in self._tail.new_records():
            self.progress.update(record["step"], record["loss"])

    def _stop_following(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class _JsonlTail:
    """The records appended to a JSON Lines file since this object was made (a resumed stage
    appends to the log of the attempt before it, whose records are not news)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen = len(self._records() or [])

    def new_records(self) -> list[dict[str, Any]]:
        records = self._records()
        if records is None:
            return []
        fresh, self.seen = records[self.seen :], len(records)
        return fresh

    def _records(self) -> list[dict[str, Any]] | None:
        """Every record, or None while the last line is half written (it is complete at the next poll)."""
        try:
            return read_jsonl(self.path)
        except FileNotFoundError:
            return []
        except ValueError:
            return None
