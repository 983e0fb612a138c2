"""Asking a person: the request that holds a step until someone answers, with its deadline,
its warning time and what they decide on.

Low in the layers because every gate asks: an exhausted budget or tenant day (`money`), the
gates before a dispatch and a retry policy that ran out (`lifecycle`), an output that loops or
was flagged (`decide`). What an answer does goes on with the step's lifecycle (dispatch it,
complete it, retry it, give it up), so it sits above that, in `approval_answers`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from cairn.coordinator.domain.builder import COORDINATOR, Decision
from cairn.events import ApprovalContext, ApprovalKind, ApprovalPolicy, ApprovalRequested


def request_approval(
    d: Decision,
    step_name: str,
    attempt: int,
    kind: ApprovalKind,
    *,
    proposed: Any,
    note: str,
) -> None:
    """Hold the step's `attempt` until a person answers a `kind` request; `proposed` is what
    they are shown (the input to send, the output to accept), `note` why they are asked."""
    run = d.run
    spec = run.workflow.step(step_name)
    gate = spec.approval or ApprovalPolicy()
    base = f"{run.run_id}:{step_name}:{attempt}:{kind}"
    request_id = base
    n = 1
    while request_id in run.approvals:
        n += 1
        request_id = f"{base}:{n}"
    due = d.at + timedelta(seconds=gate.timeout_s)
    warn = due - timedelta(seconds=gate.warn_before_s) if gate.warn_before_s else None
    d.emit(
        ApprovalRequested,
        actor=COORDINATOR,
        reason=note or f"{kind} approval for {step_name}",
        request_id=request_id,
        step=step_name,
        attempt=attempt,
        kind=kind,
        group=gate.approvers,
        due_at=due,
        warn_at=warn if warn is not None and warn > d.at else None,
        context=ApprovalContext(
            intent=run.intent,
            step=step_name,
            capability=spec.capability,
            proposed=proposed,
            cost_so_far_usd=run.cost_usd,
            estimate_usd=d.policy.estimate(spec),
            note=note,
        ),
    )
