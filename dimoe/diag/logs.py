"""Reading the training telemetry logs (docs/telemetry.md) and writing diagnostic summaries."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

Record = dict[str, Any]


def find_log(path: str | Path, stream: str) -> Path:
    """The `<stream>.jsonl` log meant by `path`: the file itself, or the file inside a `logs/`
    directory, or inside the stage directory that holds `logs/`."""
    path = Path(path)
    if path.is_file():
        return path
    candidates = [path / f"{stream}.jsonl", path / "logs" / f"{stream}.jsonl"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no {stream}.jsonl log at {path} (looked for {', '.join(str(c) for c in candidates)}); "
        "pass the log file, its logs/ directory or the stage directory"
    )


def run_name(log: Path) -> str:
    """A run's name: the stage directory holding `logs/<stream>.jsonl` (else the file's folder)."""
    folder = log.parent
    return folder.parent.name if folder.name == "logs" else folder.name


def read_log(path: str | Path, stream: str, required: tuple[str, ...]) -> tuple[Path, list[Record]]:
    """The records of one telemetry stream sorted by step; ValueError names the file and line of
    a record that is not JSON or lacks one of the `required` fields."""
    log = find_log(path, stream)
    records = []
    for number, line in enumerate(log.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{log}:{number}: not valid JSON ({exc.msg})") from None
        missing = [field for field in ("step", *required) if field not in record]
        if missing:
            raise ValueError(f"{log}:{number}: missing field(s) {', '.join(missing)} (see docs/telemetry.md)")
        records.append(record)
    if not records:
        raise ValueError(f"{log}: no records; has the run logged a step yet?")
    return log, sorted(records, key=lambda record: record["step"])


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN/inf: undefined values are written as null."""
    return value if value is not None and math.isfinite(value) else None


def series_mean(values: list[float | None]) -> float | None:
    """Mean of the defined values of a series (None when none is defined)."""
    defined = [value for value in values if value is not None]
    return sum(defined) / len(defined) if defined else None


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return path


def compared(this: dict[str, Any], other: dict[str, Any] | None) -> dict[str, Any]:
    """One run's metrics as they are, or two runs side by side under `this` / `other`."""
    return this if other is None else {"this": this, "other": other}
