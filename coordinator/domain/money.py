"""Money: charging what results report, reserving an attempt's estimate before it is sent and
settling it on its result, and what happens when the next reservation does not fit the run's
budget or its tenant's day (a person is asked, or the run fails closed).

Budgets are enforced before spending: a step's estimate (`Policy.estimate`) is reserved before
dispatch, and settled against the charges when its result comes.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from cairn.coordinator.domain.approval_requests import request_approval
from cairn.coordinator.domain.builder import COORDINATOR, Decision
from cairn.coordinator.domain.state import RunState
from cairn.events import (
    BudgetExhausted,
    BudgetReserved,
    BudgetSettled,
    CostCharged,
    RunFailed,
    TaskResult,
)


def charge(d: Decision, result: TaskResult, why: str) -> tuple[Decimal, int]:
    """One CostCharged per model the result reports; returns the amount and the tokens."""
    policy = d.policy
    spec = d.run.workflow.step(result.step)
    charged = Decimal(0)
    tokens = 0
    for usage in result.usage:
        amount = policy.prices.charge(usage)
        charged += amount or 0
        tokens += usage.input_tokens + usage.output_tokens
        priced = (
            f"priced with table {policy.prices.version}"
            if amount is not None
            else f"model {usage.model} is not in price table {policy.prices.version}"
        )
        d.emit(
            CostCharged,
            actor=COORDINATOR,
            reason=f"{why}; {priced}" if why else priced,
            task_id=result.task_id,
            step=result.step,
            capability=spec.capability,
            agent_id=result.agent_id,
            model=usage.model,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            price_table=policy.prices.version,
            amount_usd=amount if amount is not None else 0,
        )
    return charged, tokens


def charge_late(d: Decision, result: TaskResult) -> None:
    """A result that arrives too late still cost its tokens: charge them, once per task. A
    duplicate of a result already charged is not charged again."""
    if result.task_id not in d.run.charged_tasks:
        charge(d, result, "a late result's tokens were spent all the same")


def settle(d: Decision, step_name: str, attempt: int, actual: Decimal, tokens: int) -> None:
    """Close the attempt's reservation, if it had one, against what it actually cost."""
    reserved = d.run.reserved.get((step_name, attempt))
    if reserved is None:
        return
    over = actual - reserved
    d.emit(
        BudgetSettled,
        actor=COORDINATOR,
        reason=(f"${over} over the estimate" if over > 0 else "within the estimate"),
        step=step_name,
        attempt=attempt,
        reserved_usd=reserved,
        actual_usd=actual,
        actual_tokens=tokens,
    )


def reserve(d: Decision, step_name: str, attempt: int, estimate: Decimal) -> bool:
    """Set the attempt's `estimate` aside from the run's budget and its tenant's day, when it
    has either. False when it does not fit: the shortfall is recorded, and a person asked or
    the run failed."""
    run = d.run
    remaining = run.remaining_usd
    remaining_tokens = run.remaining_tokens
    if (remaining is not None and estimate > remaining) or (
        remaining_tokens is not None and remaining_tokens <= 0
    ):
        assert run.budget is not None
        _exhausted(
            d, step_name, attempt, estimate, "budget",
            reason=(
                f"step {step_name} needs ${estimate}, ${remaining} remains"
                if remaining is not None and estimate > remaining
                else f"the run's {run.budget.tokens} tokens are spent"
            ),
            note=f"raise the budget to go on: the step needs ${estimate}",
            failed=("budget exhausted; the run fails closed",
                    f"budget exhausted before step {step_name}"),
        )  # fmt: skip
        return False
    allowance = d.policy.tenant
    tenant_usd = tenant_tokens = None
    if allowance is not None:
        tenant_tokens = allowance.tokens
        if allowance.usd is not None:
            tenant_usd = allowance.usd - d.tenant_reserved
        short = (tenant_usd is not None and estimate > tenant_usd) or (
            tenant_tokens is not None and tenant_tokens <= 0
        )
        if short and not _tenant_cleared(run, step_name, attempt):
            _tenant_exhausted(d, step_name, attempt, estimate, tenant_usd, tenant_tokens)
            return False
    if run.budget is not None or allowance is not None:
        d.emit(
            BudgetReserved,
            actor=COORDINATOR,
            reason=f"estimate for {step_name} attempt {attempt}",
            step=step_name,
            attempt=attempt,
            amount_usd=estimate,
            tenant_available_usd=tenant_usd,
            tenant_available_tokens=tenant_tokens,
        )
        d.tenant_reserved += estimate
    return True


def _tenant_cleared(run: RunState, step_name: str, attempt: int) -> bool:
    """A person let this attempt run over its tenant's daily limit."""
    return any(
        a.kind == "tenant"
        and a.status == "granted"
        and a.step == step_name
        and a.attempt == attempt
        for a in run.approvals.values()
    )


def _tenant_exhausted(
    d: Decision,
    step_name: str,
    attempt: int,
    estimate: Decimal,
    usd: Decimal | None,
    tokens: int | None,
) -> None:
    tenant = d.run.tenant
    _exhausted(
        d, step_name, attempt, estimate, "tenant",
        reason=(
            f"step {step_name} needs ${estimate}, tenant {tenant} has ${usd} left today"
            if usd is not None and estimate > usd
            else f"tenant {tenant} has used its daily tokens"
        ),
        note=(
            f"tenant {tenant}'s daily limit is reached: approve to let this step run "
            "over it, deny to fail the run"
        ),
        failed=(f"tenant {tenant}'s daily limit is reached; the run fails closed",
                f"tenant daily limit reached before step {step_name}"),
        tenant_available_usd=usd,
        tenant_available_tokens=tokens,
    )  # fmt: skip


def _exhausted(
    d: Decision,
    step_name: str,
    attempt: int,
    estimate: Decimal,
    kind: Literal["budget", "tenant"],
    *,
    reason: str,
    note: str,
    failed: tuple[str, str],
    **tenant: Any,
) -> None:
    """The next reservation does not fit the run's budget (`budget`) or its tenant's day
    (`tenant`): record it, then ask a person, or fail the run (with `failed`: the reason and
    the error) when it fails closed."""
    run = d.run
    d.emit(
        BudgetExhausted,
        actor=COORDINATOR,
        reason=reason,
        step=step_name,
        needed_usd=estimate,
        remaining_usd=run.remaining_usd,
        remaining_tokens=run.remaining_tokens,
        scope="run" if kind == "budget" else "tenant",
        **tenant,
    )
    if run.budget is None or run.budget.on_exhausted == "ask":
        request_approval(d, step_name, attempt, kind, proposed=None, note=note)
    else:
        d.emit(
            RunFailed,
            actor=COORDINATOR,
            reason=failed[0],
            step=step_name,
            error=failed[1],
        )
