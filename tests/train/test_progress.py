"""Driver-side training progress: a bar on a terminal, a few plain lines in a CI log, fed from the
stage's train_metrics.jsonl as rank 0 appends to it (no Ray needed)."""

import io
import json
import threading
import time

from rich.console import Console

from dimoe.train import progress as progress_module
from dimoe.train.progress import StageWatch, StepProgress


def console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=100), out


def test_plain_lines_are_occasional_and_end_with_the_last_step():
    con, out = console(terminal=False)
    with StepProgress("stage0_naive", 100, console=con, plain_every_s=3600) as bar:
        for step in range(1, 101):
            bar.update(step, 1.0 / step)
        bar.update(100, 0.01)  # the final report repeats the last logged step
    lines = out.getvalue().splitlines()
    assert lines == [
        "stage0_naive: step 1/100, loss 1.0000 (00:00:00 elapsed)",
        "stage0_naive: step 100/100, loss 0.0100 (00:00:00 elapsed)",
    ]


def test_plain_mode_prints_the_last_step_reached_when_a_stage_stops_early():
    con, out = console(terminal=False)
    with StepProgress("s", 10, console=con, plain_every_s=3600) as bar:
        bar.update(1, 2.0)
        bar.update(4, 1.5)
    assert out.getvalue().splitlines()[-1].startswith("s: step 4/10, loss 1.5000")


def test_a_terminal_gets_a_bar_and_no_plain_lines():
    con, out = console(terminal=True)
    with StepProgress("stage2_full", 8, console=con) as bar:
        bar.update(8, 0.5)
    text = out.getvalue()
    assert "8/8" in text and "loss 0.5000" in text and "stage2_full: step" not in text


def test_disabled_progress_prints_nothing():
    con, out = console(terminal=False)
    with StepProgress("s", 4, console=con, enabled=False) as bar:
        bar.update(4, 1.0)
    assert out.getvalue() == ""


def test_stage_watch_follows_only_new_records_of_the_metrics_log(tmp_path, monkeypatch):
    """A resumed stage appends to the previous attempt's log: those records are not progress.
    Records written while `fit()` blocks reach the bar, a half-written line waits for its end."""
    monkeypatch.setattr(progress_module, "POLL_S", 0.05)
    log = tmp_path / "train_metrics.jsonl"
    log.write_text(json.dumps({"step": 7, "loss": 9.0}) + "\n")
    seen: list[tuple[int, float]] = []

    def trainer() -> None:
        with log.open("a") as handle:
            handle.write(json.dumps({"step": 8, "loss": 3.0}) + "\n")
            handle.write('{"step": 9, "lo')  # a poll may see this half line
            handle.flush()
            time.sleep(0.3)
            handle.write('ss": 2.0}\n')

    with StageWatch(tmp_path, "s", 10, enabled=True) as watch:
        watch.progress.update = lambda step, loss: seen.append((step, loss))  # type: ignore[method-assign]
        thread = threading.Thread(target=trainer)
        thread.start()
        thread.join()
        watch.finish({"step": 10, "loss": 1.0})
    assert seen == [(8, 3.0), (9, 2.0), (10, 1.0)]
