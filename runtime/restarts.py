"""Which of `cairn up`'s processes were restarted, and why: kept in `<home>/restarts.json` by
the supervisor each time it restarts one, read by the dashboard's agents page and its API.
One start of `cairn up` begins the record afresh."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESTARTS_NAME = "restarts.json"


def restarts_path(home: Path) -> Path:
    return home / RESTARTS_NAME


def record_restart(home: Path, name: str, count: int, ended: str) -> None:
    """Note that process `name` was restarted for the `count`-th time after it `ended`."""
    path = restarts_path(home)
    known = read_restarts(home)
    known[name] = {"restarts": count, "last_ended": ended, "last_at": datetime.now(UTC).isoformat()}
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(known, indent=2, sort_keys=True))
    os.replace(partial, path)  # whole or absent, for whoever reads it


def forget_restarts(home: Path) -> None:
    """A new start of the stack: no restart recorded yet."""
    restarts_path(home).unlink(missing_ok=True)


def read_restarts(home: Path) -> dict[str, dict[str, Any]]:
    """Per process name: `restarts` (how many), `last_ended` (how it ended last), `last_at`
    (when it was last restarted). Empty when nothing was restarted or the file is unreadable."""
    try:
        data = json.loads(restarts_path(home).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
