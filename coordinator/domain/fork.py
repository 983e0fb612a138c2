"""Forking a run: a new run that starts from another's state after one of its events. The
parent's completed outputs are taken over (not paid for again), overrides replace outputs,
steps given another model run again with it, and every step built from an overridden or re-run
output runs again. Pure: the parent's recorded events and the command in, the new run's start
fact out (or a refusal saying what is wrong with the command).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime

from pydantic import BaseModel, ValidationError

from cairn.coordinator.domain.facts import Rejected, StartRunFact
from cairn.coordinator.domain.graph import descendants
from cairn.coordinator.domain.state import fold
from cairn.events import CarriedOutput, Event, ForkOrigin, ForkRun
from cairn.events.validation import validation_reason


def fork_fact(
    parent: Sequence[Event],
    command: ForkRun,
    contract: Callable[[str], type[BaseModel]],
    *,
    run_id: uuid.UUID,
    at: datetime,
    trace_id: str | None = None,
    trace_span_id: str | None = None,
) -> StartRunFact:
    """The start of the run `command` forks from the `parent` run's events, as run `run_id` at
    `at`; `contract` finds the output contract an override must meet. Raises `Rejected` with
    the reason when the command does not fit the parent."""
    if not parent:
        raise Rejected(f"unknown run {command.parent_run_id}")
    if command.at_seq > len(parent):
        raise Rejected(
            f"run {command.parent_run_id} has {len(parent)} events, not {command.at_seq}"
        )
    state = fold(list(parent[: command.at_seq]))
    assert state is not None
    workflow = state.workflow
    carried: dict[str, CarriedOutput] = {}
    for name, step in state.steps.items():
        if step.status == "completed" and step.output is not None:
            carried[name] = CarriedOutput(
                output=step.output,
                source=f"run {state.run_id} step {name} attempt {step.attempt}",
            )
    for name, output in command.overrides.items():
        if name not in state.steps:
            raise Rejected(f"run has no step {name!r} to override")
        spec = workflow.step(name)
        if spec.contract:
            try:
                contract(spec.contract).model_validate(output)
            except ValidationError as exc:
                raise Rejected(
                    validation_reason(exc, f"the override of {name} ({spec.contract})")
                ) from None
        for later in descendants(workflow, name):
            carried.pop(later, None)  # built from the old output: they run again
        carried[name] = CarriedOutput(output=output, source=f"override by {command.requested_by}")
    for name, model in command.models.items():
        if name not in state.steps:
            raise Rejected(f"run has no step {name!r} to set a model for")
        if name in command.overrides:
            raise Rejected(
                f"step {name!r} has both an override and a model: an overridden "
                "output is not produced by any model; give one or the other"
            )
        for later in {name, *descendants(workflow, name)} - command.overrides.keys():
            carried.pop(later, None)  # runs again with the new model, or built from it
        workflow = workflow.model_copy(
            update={
                "steps": [
                    s.model_copy(update={"model": model}) if s.name == name else s
                    for s in workflow.steps
                ]
            }
        )
    return StartRunFact(
        run_id=run_id,
        workflow=workflow,
        input=state.input,
        intent=state.intent,
        requested_by=command.requested_by,
        at=at,
        budget=state.budget,
        tenant=state.tenant,
        forked_from=ForkOrigin(
            run_id=command.parent_run_id, seq=command.at_seq, models=command.models
        ),
        carried=carried,
        trace_id=trace_id,
        trace_span_id=trace_span_id,
    )
