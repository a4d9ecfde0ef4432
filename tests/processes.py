"""Stopping whole process sessions that tests start (Ray clusters, Prometheus) by pid, since
`ray stop` would also stop every other Ray cluster on the machine."""

import os
import signal
import time
from pathlib import Path


def process_table() -> dict[int, tuple[int, int]]:
    """pid → (ppid, session id) of every live process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return table


def session_processes(sid: int) -> set[int]:
    """The processes of session `sid` and all their descendants (a Ray job driver runs in a session
    of its own under the supervisor actor)."""
    table = process_table()
    found = {pid for pid, (_, s) in table.items() if s == sid}
    frontier = set(found)
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return found


def stop_session(sid: int, term_grace_s: float) -> set[int]:
    """SIGTERM, then SIGKILL, to every process of session `sid`; returns what survived both."""
    for sig, grace_s in ((signal.SIGTERM, term_grace_s), (signal.SIGKILL, 10.0)):
        for pid in session_processes(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while session_processes(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
    return session_processes(sid)
