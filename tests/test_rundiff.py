"""`cairn diff`: two runs side by side, from the record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from cairn.coordinator.domain.decide import decide
from cairn.coordinator.domain.facts import Policy, ResultFact, StartRunFact, task_id
from cairn.coordinator.domain.state import fold
from cairn.coordinator.history.diff import diff_runs
from cairn.coordinator.pricing import load_price_table
from cairn.coordinator.workflow import parse_workflow
from cairn.events import Event, Intent, TaskError, TaskResult, Usage
from cairn.events.contracts import resolve_contract
from cairn.runtime.eventlog.store import EventStore
from cairn.runtime.settings import Settings

T0 = datetime(2026, 2, 1, tzinfo=UTC)
POLICY = Policy(load_price_table(), resolve_contract)
WORKFLOW = parse_workflow(
    {"name": "two", "steps": [
        {"name": "a", "capability": "x", "retry": {"max_attempts": 2, "backoff_s": 0}},
        {"name": "b", "capability": "y"},
    ]}
)  # fmt: skip


def run(outputs: list[tuple[str, dict[str, Any] | None, int]]) -> list[Event]:
    """A run fed the given (step, output or None for an error, tokens) results in order."""
    run_id = uuid.uuid4()
    events = decide(
        None,
        StartRunFact(run_id=run_id, workflow=WORKFLOW, input={}, intent=Intent(goal="g"),
                     requested_by="client:t", at=T0),
        POLICY,
    )  # fmt: skip
    attempts: dict[str, int] = {}
    for step, output, tokens in outputs:
        attempts[step] = attempts.get(step, 0) + 1
        result = TaskResult(
            task_id=task_id(run_id, step, attempts[step]), run_id=run_id, step=step,
            attempt=attempts[step], agent_id=f"{step}-1", output=output,
            error=None if output is not None else TaskError(message="boom"),
            usage=[Usage(model="cairn-offline-1", input_tokens=tokens, output_tokens=0)],
            started_at=T0, finished_at=T0,
        )  # fmt: skip
        state = fold(events)
        assert state is not None
        events += decide(state, ResultFact(result=result, at=T0), POLICY)
    return events


def test_diff_names_the_first_different_decision_and_the_step_differences() -> None:
    a = run([("a", {"v": 1}, 1000), ("b", {"w": 1}, 1000)])
    b = run([("a", None, 500), ("a", {"v": 2}, 1000), ("b", {"w": 1}, 1000)])
    result = diff_runs(a, b)
    assert result.status == ("completed", "completed")
    assert result.first_divergence is not None
    seq, left, right = result.first_divergence
    assert seq == 5
    assert left == "TaskCompleted(a)"
    assert right == "TaskFailed(a)"
    rows = {row.step: row for row in result.steps}
    assert rows["a"].attempts == (1, 2)
    assert not rows["a"].same_output
    assert rows["b"].same_output
    assert rows["a"].cost_usd == (Decimal("0.0005"), Decimal("0.00075"))
    same = diff_runs(a, a)
    assert same.first_divergence is None


def test_diff_command(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    a = run([("a", {"v": 1}, 10), ("b", {"w": 1}, 10)])
    b = run([("a", {"v": 9}, 10)])
    store = EventStore(settings.store)
    store.append(a + b)
    store.close()
    env = {**os.environ, **settings.env(), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "cairn.cli", "diff", str(a[0].run_id),
         str(b[0].run_id)[:8], "--json"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == ["completed", "running"]
    assert out["first_divergence"] is None  # b is a's start with another output, so far
    steps = {row["step"]: row for row in out["steps"]}
    assert steps["a"]["output_hash"][0] != steps["a"]["output_hash"][1]
    assert steps["b"]["status"] == ["completed", "dispatched"]
