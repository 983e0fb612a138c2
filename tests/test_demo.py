"""`cairn demo` as a user runs it: embedded NATS, six service processes, one run, nothing left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import process_alive


@pytest.mark.timeout(120)
def test_demo_runs_through_separate_processes_and_leaves_none(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "CAIRN_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "cairn.cli", "demo", "--json", "--yes",
         "--home", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["status"] == "completed"
    assert summary["output"]["report"]["sections"]
    assert Decimal(summary["cost_usd"]) > 0
    assert sum(Decimal(c["amount_usd"]) for c in summary["costs_by_model"]) == Decimal(
        summary["cost_usd"]
    )
    processes = summary["processes"]
    assert set(processes) == {
        "coordinator",
        "projections",
        "agent-planner",
        "agent-researcher",
        "agent-writer",
        "agent-reviewer",
        "nats-server",
    }
    assert len(set(processes.values())) == 7
    assert not [name for name, pid in processes.items() if process_alive(pid)]
    assert not (tmp_path / "nats.url").exists()  # the embedded server is gone, so is its URL
    # The record outlives the processes: the query commands read it without NATS.
    shown = subprocess.run(
        [sys.executable, "-m", "cairn.cli", "show", summary["run_id"], "--json",
         "--home", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["run"]["status"] == "completed"


@pytest.mark.timeout(120)
def test_demo_progress_display(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "CAIRN_"))}
    env["COLUMNS"] = "120"
    proc = subprocess.run(
        [sys.executable, "-m", "cairn.cli", "demo", "--yes", "--home", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for step in ("plan", "research", "write", "review"):
        assert step in out
    assert "✓ completed" in out
    assert "cairn show" in out
    assert "cairn costs" in out
    assert "cost: $" in out
