"""Liveness for container health checks.

A service given `CAIRN_HEALTH_FILE` (`Settings.health_file`) touches that file each time its
main loop turns (the coordinator's log follower, the projection runner's loop, an agent's pull
loops). `python -m cairn.runtime.health`
exits 0 while the file is fresh and 1 with one sentence when it is stale or missing, so an
orchestrator can tell a stuck process from a busy one without going through NATS, where any
replica would answer for it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from cairn.runtime.settings import Settings, SettingsError

DEFAULT_MAX_AGE_S = 15.0


class Heartbeat:
    """Touch the health file at most once a second (no file named: do nothing)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._last = 0.0

    def beat(self) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if now - self._last < 1.0:
            return
        self._last = now
        # A health file that cannot be written reads as stale: the check says so.
        with contextlib.suppress(OSError):
            self.path.touch()


def check(path: Path, max_age_s: float = DEFAULT_MAX_AGE_S) -> str | None:
    """None when the file was touched within `max_age_s`; otherwise why not."""
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return f"{path} is missing: the service has not started its loop"
    if age > max_age_s:
        return f"{path} was last touched {age:.0f}s ago (limit {max_age_s:g}s): the loop is stuck"
    return None


def main() -> None:
    try:
        named = sys.argv[1] if len(sys.argv) > 1 else Settings.from_env().health_file
    except SettingsError as exc:
        sys.stderr.write(f"{exc}\n")
        sys.exit(2)
    if not named:
        sys.stderr.write("name the health file: an argument or CAIRN_HEALTH_FILE\n")
        sys.exit(2)
    max_age = float(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_MAX_AGE_S
    problem = check(Path(named), max_age)
    if problem:
        sys.stderr.write(f"unhealthy: {problem}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
