"""Shared I/O: JSON and JSON Lines files, atomic output folders, and Ray start-up.

Every module that reads or writes a JSON file, replaces an output folder or starts Ray goes through
here, so error messages (file and line of a bad record) and safety rules (never delete a folder this
library did not write) are the same everywhere. Light on purpose: nothing heavy is imported at
module level.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from dimoe.errors import UserError


class OutputDirError(UserError):
    """An output folder that cannot be replaced safely."""


class JsonFileError(UserError):
    """A JSON or JSON Lines file that does not parse; the message names the file and line."""


def read_json(path: str | Path) -> Any:
    """Parse one JSON document; a syntax error names the file and line."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise JsonFileError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno}); "
            "JSON Lines files must be named *.jsonl"
        ) from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a bad line names the file and line."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise JsonFileError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                kind = type(record).__name__
                raise JsonFileError(f"{path}:{line_number}: expected a JSON object, got {kind}")
            yield line_number, record


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every object of a JSON Lines file (blank lines skipped)."""
    return [record for _, record in iter_jsonl(path)]


def write_json(path: str | Path, data: Any, *, indent: int | None = 2) -> Path:
    """Write `data` as UTF-8 JSON through a temporary file, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object per line (UTF-8), replacing the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record to a JSON Lines log (created on first use)."""
    with Path(path).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")


@contextmanager
def atomic_output_dir(out_dir: str | Path, marker: str) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `out_dir`.

    An existing `out_dir` is only replaced when it is empty or holds `marker` (a file this
    library writes), so a mistyped path never deletes someone's data.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / marker).exists():
        raise OutputDirError(
            f"refusing to replace {out_dir}: it is not empty and has no {marker}; "
            "choose a new output directory"
        )
    tag = uuid.uuid4().hex[:8]
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{tag}"
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports free on `host` right now, for servers started on this machine.
    All are bound at once before any is released, so the OS cannot hand out the same port twice."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to (or start) Ray unless this process already did; callers and tests own the cluster.

    `address` None connects to RAY_ADDRESS when set (a `ray job submit` driver) and otherwise starts
    a local cluster. Worker output is not forwarded to this driver (`log_to_driver=False`): the
    library reports progress from the driver itself, and worker logs stay in Ray's session folder.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus, log_to_driver=False)
