"""What a run's page needs that the views do not keep, folded from the run's own events."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from cairn.events import Budget, BudgetRaised, CostCharged, Event, RunStarted, TaskCompleted
from cairn.projections import step_provenance
from cairn.projections.http.models import BudgetView


def step_outputs(events: Sequence[Event]) -> dict[str, Any]:
    """Each completed step's accepted output, in the order the steps completed."""
    done = dict.fromkeys(e.step for e in events if isinstance(e, TaskCompleted))
    return {step: step_provenance(events, step).output for step in done}


def budget_of(events: Sequence[Event]) -> BudgetView | None:
    """The run's budget as last set and what it has spent, or None for a run without one."""
    started = next((e for e in events if isinstance(e, RunStarted)), None)
    budget = started.budget if started is not None else None
    for event in events:
        if isinstance(event, BudgetRaised):
            budget = (budget or Budget()).raised(event.usd, event.tokens)
    if budget is None:
        return None
    charges = [e for e in events if isinstance(e, CostCharged)]
    spent = sum((c.amount_usd for c in charges), Decimal(0))
    return BudgetView(
        usd=budget.usd,
        tokens=budget.tokens,
        on_exhausted=budget.on_exhausted,
        spent_usd=spent,
        spent_tokens=sum(c.input_tokens + c.output_tokens for c in charges),
        remaining_usd=budget.usd - spent if budget.usd is not None else None,
    )
