"""What a person's answer, or its absence, does to a held step: a grant lets it go on, a denial
refuses it; approval timers warn before the deadline, then escalate or expire the request.

Above the step's lifecycle because going on and refusing are lifecycle moves (dispatch,
complete, retry, give up). Asking is low, in `approval_requests`, because every gate asks.
"""

from __future__ import annotations

from datetime import timedelta

from cairn.coordinator.domain.builder import COORDINATOR, Decision
from cairn.coordinator.domain.facts import (
    APPROVE_REASON,
    DENY_REASON,
    ApprovalFact,
    Policy,
    Rejected,
    TimerFact,
)
from cairn.coordinator.domain.lifecycle import begin, complete, give_up, retry_or_fail
from cairn.coordinator.domain.state import RunState
from cairn.events import (
    ApprovalDenied,
    ApprovalEscalated,
    ApprovalExpired,
    ApprovalGranted,
    ApprovalPolicy,
    ApprovalWarned,
    Event,
    RunFailed,
)


def answer(state: RunState, fact: ApprovalFact, policy: Policy) -> list[Event]:
    """A person approved or denied the step's pending request."""
    step = state.steps.get(fact.step)
    if step is None:
        raise Rejected(f"run {state.run_id} has no step {fact.step!r}")
    if step.approval_id is None:
        latest = [a for a in state.approvals.values() if a.step == fact.step]
        if not latest:
            raise Rejected(f"step {fact.step} has no approval request")
        last = latest[-1]
        if last.status == "expired":
            raise Rejected(
                f"the approval request for {fact.step} expired at {last.due_at.isoformat()}"
            )
        raise Rejected(
            f"the approval request for {fact.step} was already {last.status} by {last.by}"
        )
    if state.terminal:
        raise Rejected(f"run {state.run_id} is already {state.status}")
    approval = state.approvals[step.approval_id]
    if fact.approve and approval.kind == "budget":
        raise Rejected(
            "this request waits for more budget: raise it with `cairn budget raise` "
            "(or deny to fail the run)"
        )
    d = Decision(state, state.run_id, fact.at, policy)
    actor = f"human:{fact.by}"
    if fact.approve:
        d.emit(
            ApprovalGranted,
            actor=actor,
            reason=fact.reason or APPROVE_REASON,
            request_id=approval.request_id,
            step=fact.step,
            by=fact.by,
        )
        _resume(d, approval.step, approval.kind, approval.attempt, f"approved by {fact.by}")
    else:
        reason = fact.reason or DENY_REASON
        d.emit(
            ApprovalDenied,
            actor=actor,
            reason=reason,
            request_id=approval.request_id,
            step=fact.step,
            by=fact.by,
        )
        _refuse(d, approval.step, approval.kind, f"denied by {fact.by}: {reason}")
    return d.events


def approval_timer(state: RunState, fact: TimerFact, policy: Policy) -> list[Event]:
    """A pending request's warning time or deadline came: warn its group, escalate it to the
    next group, or let it expire (a denial, or the run fails, as the step's gate says)."""
    if not state.timer_matters(fact.kind, fact.step, fact.attempt, fact.request_id):
        return []
    approval = state.approvals[fact.request_id or ""]
    d = Decision(state, state.run_id, fact.at, policy)
    gate = state.workflow.step(approval.step).approval or ApprovalPolicy()
    if fact.kind == "approval_warn":
        assert approval.warn_at is not None  # else the timer would not matter
        if fact.at < approval.warn_at:
            return []
        d.emit(
            ApprovalWarned,
            actor=COORDINATOR,
            reason=f"expires at {approval.due_at.isoformat()}",
            request_id=approval.request_id,
            step=approval.step,
            due_at=approval.due_at,
        )
        return d.events
    if fact.at < approval.due_at:
        return []  # an old timer: the request was escalated since
    if gate.on_expiry == "escalate" and approval.escalations < len(gate.escalate_to):
        group = gate.escalate_to[approval.escalations]
        due = fact.at + timedelta(seconds=gate.timeout_s)
        warn = due - timedelta(seconds=gate.warn_before_s) if gate.warn_before_s else None
        d.emit(
            ApprovalEscalated,
            actor=COORDINATOR,
            reason=f"nobody in {approval.group} decided in time",
            request_id=approval.request_id,
            step=approval.step,
            group=group,
            due_at=due,
            warn_at=warn,
        )
        return d.events
    d.emit(
        ApprovalExpired,
        actor=COORDINATOR,
        reason=f"nobody decided by {approval.due_at.isoformat()}",
        request_id=approval.request_id,
        step=approval.step,
    )
    why = f"approval expired at {approval.due_at.isoformat()}"
    if gate.on_expiry == "deny":
        _refuse(d, approval.step, approval.kind, why)
    else:
        d.emit(RunFailed, actor=COORDINATOR, reason=why, step=approval.step, error=why)
    return d.events


def _resume(d: Decision, step_name: str, kind: str, attempt: int, why: str) -> None:
    """Go on after a granted request."""
    step = d.run.step(step_name)
    if kind == "output":
        complete(d, step_name, 0.0)
    elif kind in ("exhausted", "loop"):
        # One more attempt than the policy allowed (the grant added it), with what went wrong.
        begin(d, step_name, attempt + 1, f"another attempt {why}", list(step.repair))
    else:  # before, cost, budget: the dispatch that was held
        begin(d, step_name, attempt, why, list(step.repair))


def _refuse(d: Decision, step_name: str, kind: str, why: str) -> None:
    """What a denial (or an expiry that counts as one) does to the step."""
    if kind == "output":
        retry_or_fail(
            d, step_name, f"output rejected, {why}", cause="error", retryable=True, repair=[why]
        )
    elif kind in ("before", "cost"):
        give_up(d, step_name, f"step {step_name} was not approved", why)
    else:
        d.emit(
            RunFailed,
            actor=COORDINATOR,
            reason=f"step {step_name} {why}",
            step=step_name,
            error=why,
        )
