"""Reading the training telemetry logs (docs/telemetry.md) that the diagnostics summarise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dimoe.errors import UserError
from dimoe.io import iter_jsonl

Record = dict[str, Any]


class DiagError(UserError):
    """A log, manifest or option the diagnostics cannot use; the message says which and why."""


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
    """The records of one telemetry stream sorted by step; DiagError names the file and line of a
    record that is not JSON or lacks one of the `required` fields."""
    log = find_log(path, stream)
    records = []
    for number, record in iter_jsonl(log):
        missing = [field for field in ("step", *required) if field not in record]
        if missing:
            raise DiagError(f"{log}:{number}: missing field(s) {', '.join(missing)} (see docs/telemetry.md)")
        records.append(record)
    if not records:
        raise DiagError(f"{log}: no records; has the run logged a step yet?")
    return log, sorted(records, key=lambda record: record["step"])
