"""The open approval requests the coordinator answers `cairn.cmd.approvals` with: one row per
pending request of the runs it holds, oldest deadline first."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cairn.coordinator.domain.state import RunState


def pending_approvals(runs: Iterable[RunState]) -> list[dict[str, Any]]:
    """Each pending request of `runs`, with what a person deciding it wants to see."""
    pending = []
    for state in runs:
        for approval in state.pending_approvals():
            step = state.steps[approval.step]
            pending.append(
                {
                    "run_id": str(state.run_id),
                    "workflow": state.workflow.name,
                    "goal": state.intent.goal,
                    "step": approval.step,
                    "attempt": approval.attempt,
                    "kind": approval.kind,
                    "group": approval.group,
                    "due_at": approval.due_at.isoformat(),
                    "request_id": approval.request_id,
                    "cost_so_far_usd": str(state.cost_usd),
                    "step_status": step.status,
                }
            )
    return sorted(pending, key=lambda a: a["due_at"])
