"""The shape of a run's steps: what each step needs (declared, or referenced by its input),
every step it was built from or that is built from it, the lineage a task carries, and the
context its input mapping is resolved in.
"""

from __future__ import annotations

import weakref
from typing import Any

from cairn.coordinator.domain.mapping import referenced_steps
from cairn.coordinator.domain.state import RunState
from cairn.events import Lineage, WorkflowSpec


def dependencies(workflow: WorkflowSpec, step_name: str) -> frozenset[str]:
    """The steps a step needs: declared (or the one before it) and referenced by its input.
    Worked out once per workflow object: every decision asks, for every pending step."""
    ref = _shapes.get(id(workflow))
    if ref is None or ref() is not workflow:
        ref = _Shape(workflow, _forget_shape)
        ref.key = id(workflow)
        ref.deps = {
            s.name: frozenset(workflow.needs_of(s.name)) | referenced_steps(s.input)
            for s in workflow.steps
        }
        _shapes[ref.key] = ref
    deps = ref.deps.get(step_name)
    if deps is None:
        raise KeyError(step_name)
    return deps


class _Shape(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to a workflow that carries its steps' dependencies; it leaves the
    cache with the workflow (workflows are frozen, so what is worked out stays true)."""

    __slots__ = ("deps", "key")
    deps: dict[str, frozenset[str]]
    key: int


_shapes: dict[int, _Shape] = {}


def _forget_shape(ref: _Shape) -> None:
    if _shapes.get(ref.key) is ref:
        del _shapes[ref.key]


def descendants(workflow: WorkflowSpec, step_name: str) -> set[str]:
    """Every step built from the step's output, directly or through another step."""
    return {s.name for s in workflow.steps if step_name in ancestors(workflow, s.name)}


def ancestors(workflow: WorkflowSpec, step_name: str) -> set[str]:
    """Every step whose output the step was built from, directly or through another step."""
    found: set[str] = set()
    todo = list(dependencies(workflow, step_name))
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo.extend(dependencies(workflow, name))
    return found


def lineage(run: RunState, step_name: str) -> list[Lineage]:
    """The completed outputs the step is built from, in workflow order: what its task carries."""
    built_from = ancestors(run.workflow, step_name)
    return [
        Lineage(
            step=name,
            attempt=run.steps[name].attempt,
            agent_id=run.steps[name].agent_id or "",
            output_hash=run.steps[name].output_hash or "",
        )
        for name in [s.name for s in run.workflow.steps]
        if run.steps[name].status == "completed" and name in built_from
    ]


def mapping_context(run: RunState) -> dict[str, Any]:
    """What `$input`, `$intent` and `$steps.<name>.output` refer to in the run right now."""
    return {
        "input": run.input,
        "intent": run.intent.model_dump(mode="json"),
        "steps": {
            name: {"output": s.output, "agent_id": s.agent_id}
            for name, s in run.steps.items()
            if s.status == "completed"
        },
    }
