"""`cairn bench`: what one step costs and how much work cairn gets through, next to the limits
of the machine it runs on and to two peers, all measured in one run.

Everything happens in a scratch folder: its own `nats-server`, event store and views, with the
coordinator and echo agents (`cairn.agents.examples.echo`) as separate processes, as in production.
The result is one table (`report.Report`); a figure that could not be measured has no
value and says why in its note. Targets stand beside the figures; nothing here asserts them.

This module runs the measurements in order (`run_bench`): the machine's limits (`limits`), the
phases through real processes (`live`), the log work (`logwork`) and the peers (`peers`, each
in a child process), then builds the rows (`rows`).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cairn.benchmarks.limits import sqlite_commits
from cairn.benchmarks.live import measure_live
from cairn.benchmarks.logwork import measure_log
from cairn.benchmarks.report import Report, Row, load_average, machine_info, source_commit
from cairn.benchmarks.rows import (
    limit_rows,
    log_rows,
    memory_rows,
    peer_rows,
    step_floor,
    step_rows,
)
from cairn.benchmarks.scale import FULL, PEERS, QUICK, Scale
from cairn.benchmarks.services import BenchError, Progress
from cairn.runtime.settings import Settings


def measure_peer(name: str, workdir: Path, runs: int) -> dict[str, Any]:
    folder = workdir / "peers" / name
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "cairn.benchmarks.peers", name]
    command += ["--runs", str(runs), "--dir", str(folder)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "did not finish within 300 s"}
    lines = done.stdout.strip().splitlines()
    try:
        outcome: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        return {"ok": False, "error": f"exited with {done.returncode}: {' '.join(tail)}"}
    return outcome


def run_bench(workdir: Path, scale: Scale, progress: Progress | None = None) -> Report:
    """Take every measurement in `workdir` (a scratch folder on the disk to be measured) and
    return the table."""
    say = progress or (lambda _: None)
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    machine = machine_info()
    workdir.mkdir(parents=True, exist_ok=True)
    say("limits: SQLite commits")
    commits, synchronous = sqlite_commits(workdir / "commit.db", scale.samples)
    live = asyncio.run(measure_live(workdir, scale, say))
    folder = workdir / "log"
    log = measure_log(
        Settings(home=folder, store_url=str(folder / "events.db"), views_url=str(folder / "v.db")),
        scale.history_events,
        say,
    )
    peers = {}
    for name, label in PEERS.items():
        say(f"peers: {label}")
        peers[name] = measure_peer(name, workdir, scale.peer_runs)
    machine["load_end"] = load_average()
    floor = step_floor(commits, live)
    rows = [
        *limit_rows(commits, synchronous, live, floor),
        *step_rows(scale, live, floor),
        *log_rows(log),
        *memory_rows(scale, live),
        *peer_rows(live, peers),
    ]
    details = {
        "scale": asdict(scale),
        "throughput": live.throughput,
        "history": {"events": log.events, "batches": log.batches},
        "peers": {k: {n: v for n, v in p.items() if n != "intervals_ms"} for k, p in peers.items()},
        "errors": {**live.errors, **log.errors},
    }
    return Report(
        started_at=started_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
        seconds=time.perf_counter() - started,
        scale=scale.name,
        commit=source_commit(),
        machine=machine,
        rows=rows,
        details=details,
    )


__all__ = ["FULL", "QUICK", "BenchError", "Report", "Row", "Scale", "run_bench"]
