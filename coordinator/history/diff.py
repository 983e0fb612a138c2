"""Where two runs' decisions, outputs and costs differ (`cairn diff`). Pure: events in, rows out."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from cairn.coordinator.domain.state import RunState, fold
from cairn.events import CostCharged, Event, ResultReceived, TaskCompleted, TaskDispatched


@dataclass(frozen=True)
class StepDiff:
    """One step side by side: what each run did with it."""

    step: str
    status: tuple[str, str]
    attempts: tuple[int, int]
    agents: tuple[str, str]
    models: tuple[str, str]
    output_hash: tuple[str, str]
    cost_usd: tuple[Decimal, Decimal]

    @property
    def same_output(self) -> bool:
        return self.output_hash[0] == self.output_hash[1] != ""


@dataclass(frozen=True)
class RunDiff:
    status: tuple[str, str]
    cost_usd: tuple[Decimal, Decimal]
    events: tuple[int, int]
    # The first position where the runs recorded a different kind of decision, with both sides
    # (type and step), or None when one history is a prefix of the other.
    first_divergence: tuple[int, str, str] | None
    steps: list[StepDiff] = field(default_factory=list)


def _decision(event: Event) -> str:
    step = getattr(event, "step", None)
    return f"{event.type_name()}({step})" if isinstance(step, str) else event.type_name()


@dataclass
class _Tally:
    attempts: int = 0
    agents: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    output_hash: str = ""
    cost: Decimal = Decimal(0)


def _per_step(events: list[Event]) -> dict[str, _Tally]:
    steps: dict[str, _Tally] = {}
    for event in events:
        if isinstance(event, TaskDispatched):
            tally = steps.setdefault(event.step, _Tally())
            tally.attempts = max(tally.attempts, event.attempt)
        elif isinstance(event, ResultReceived):
            steps.setdefault(event.step, _Tally()).agents.add(event.agent_id)
        elif isinstance(event, CostCharged):
            tally = steps.setdefault(event.step, _Tally())
            tally.models.add(event.model)
            tally.cost += event.amount_usd
        elif isinstance(event, TaskCompleted):
            steps.setdefault(event.step, _Tally()).output_hash = event.output_hash
    return steps


def _status(state: RunState | None, step: str) -> str:
    return state.steps[step].status if state is not None and step in state.steps else "-"


def diff_runs(a: list[Event], b: list[Event]) -> RunDiff:
    """Compare two runs' histories (e.g. a run and its re-run under other code or prices)."""
    state_a, state_b = fold(a), fold(b)
    first = None
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if _decision(x) != _decision(y):
            first = (i + 1, _decision(x), _decision(y))
            break
    steps_a, steps_b = _per_step(a), _per_step(b)
    rows = []
    for name in dict.fromkeys([*steps_a, *steps_b]):
        ta, tb = steps_a.get(name, _Tally()), steps_b.get(name, _Tally())
        rows.append(
            StepDiff(
                step=name,
                status=(_status(state_a, name), _status(state_b, name)),
                attempts=(ta.attempts, tb.attempts),
                agents=(", ".join(sorted(ta.agents)), ", ".join(sorted(tb.agents))),
                models=(", ".join(sorted(ta.models)), ", ".join(sorted(tb.models))),
                output_hash=(ta.output_hash, tb.output_hash),
                cost_usd=(ta.cost, tb.cost),
            )
        )
    return RunDiff(
        status=(
            state_a.status if state_a else "-",
            state_b.status if state_b else "-",
        ),
        cost_usd=(
            state_a.cost_usd if state_a else Decimal(0),
            state_b.cost_usd if state_b else Decimal(0),
        ),
        events=(len(a), len(b)),
        first_divergence=first,
        steps=rows,
    )
