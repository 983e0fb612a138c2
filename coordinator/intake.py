"""A run's input checked at the door, before anything is recorded.

A start names its workflow (from the catalog, or given inline) and brings an input. The input
must fit the workflow's `input_schema` when it has one (a registered model `Name@version`, or a
JSON Schema), and it must hold what the steps' `$input` references point at, a `?? default`
making one optional. What does not fit is refused with the field and the reason, and no run is
created: a run that could only fail at its first dispatch helps nobody.

Forks take their input from the parent run and replay re-decides what was recorded: neither
comes through here, so a history recorded before these checks replays as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.validators import validator_for
from pydantic import BaseModel, ValidationError

from cairn.coordinator.domain.mapping import ReferenceError_, lookup, references_with_defaults
from cairn.coordinator.workflow import WorkflowCatalog, check_workflow
from cairn.events import StartRun, WorkflowSpec, error_location
from cairn.events.contracts import resolve_contract

# How many problems one refusal names; the rest are counted.
MAX_PROBLEMS = 3


class InputError(ValueError):
    """A run's input does not fit its workflow; the message names the field, why, and the fix."""


def admit_start(command: StartRun, catalog: WorkflowCatalog) -> WorkflowSpec:
    """The workflow a start command names, checked, with the command's input checked against
    it. Raises WorkflowError (no such workflow, a broken one) or InputError."""
    if isinstance(command.workflow, WorkflowSpec):
        spec = command.workflow
        check_workflow(spec, f"workflow {spec.name!r}")
    else:
        spec = catalog.get(command.workflow)
    check_input(spec, command.input)
    return spec


def check_input(spec: WorkflowSpec, data: dict[str, Any]) -> None:
    """Refuse input that does not fit the workflow's schema or lacks what its steps refer to."""
    schema = spec.input_schema
    if schema is not None:
        problems = list(_schema_problems(schema, data))
        if problems:
            named = schema if isinstance(schema, str) else "JSON Schema"
            raise InputError(
                f"the input does not fit the input schema of workflow {spec.name!r} ({named}): "
                f"{_listed(problems)}; correct the input and start the run again"
            )
    missing = list(_missing_references(spec, data))
    if missing:
        raise InputError(
            f"the input lacks what workflow {spec.name!r} refers to: {_listed(missing)}; give "
            "those fields (or a `?? default` on the reference in the workflow)"
        )


def _schema_problems(schema: str | dict[str, Any], data: dict[str, Any]) -> Iterator[str]:
    if isinstance(schema, str):
        model: type[BaseModel] = resolve_contract(schema)
        try:
            model.model_validate(data)
        except ValidationError as exc:
            for detail in exc.errors(include_url=False):
                yield f"{error_location(('input', *detail['loc']))}: {detail['msg']}"
        return
    validator = validator_for(schema, default=Draft202012Validator)(schema)
    seen: set[str] = set()
    for error in sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.path]):
        path = ("input", *error.absolute_path)
        required = error.validator_value
        if error.validator == "required" and isinstance(error.instance, dict):
            assert isinstance(required, list)  # the schema was checked with the workflow
            lines = [
                f"{error_location((*path, name))}: Field required"
                for name in required
                if name not in error.instance
            ]
        else:
            lines = [f"{error_location(path)}: {error.message}"]
        for line in lines:
            if line not in seen:
                seen.add(line)
                yield line


def _missing_references(spec: WorkflowSpec, data: dict[str, Any]) -> Iterator[str]:
    """`input.<field>: missing (step S refers to $input.<field>)` for each required reference
    the input does not hold, in the steps' input mappings and the workflow's output."""
    context = {"input": data}
    seen: set[str] = set()
    templates = [(f"step {step.name!r}", step.input) for step in spec.steps]
    templates.append(("the workflow's output", spec.output))
    for where, template in templates:
        for ref, optional in references_with_defaults(template):
            if optional or ref.split(".")[0] != "input" or ref in seen:
                continue
            try:
                lookup(context, ref)
            except ReferenceError_:
                seen.add(ref)
                yield f"{ref}: missing ({where} refers to ${ref})"


def _listed(problems: list[str]) -> str:
    shown = "; ".join(problems[:MAX_PROBLEMS])
    more = len(problems) - MAX_PROBLEMS
    return shown + (f" (and {more} more)" if more > 0 else "")
