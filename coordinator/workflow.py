"""Workflow definitions: loading them from YAML, checking what the model cannot (references
and contracts), and the catalog the coordinator starts runs from. How a step's input mapping
is resolved is pure and lives in `domain/mapping.py`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cairn.coordinator.domain.mapping import references
from cairn.events import WorkflowSpec, error_lines
from cairn.events.contracts import UnknownContractError, resolve_contract

# Modules whose import registers output contracts; CAIRN_CONTRACTS adds more (comma-separated).
DEFAULT_CONTRACT_MODULES = ("cairn.agents.examples.contracts",)


def load_contract_modules(extra: Iterable[str] = ()) -> None:
    """Import the modules that register output contracts: cairn's own and `extra` (a process
    passes `Settings.contract_modules` once, at start). Importing twice is free."""
    for name in (*DEFAULT_CONTRACT_MODULES, *extra):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise WorkflowError(f"cannot import contract module {name!r}: {exc}") from None


class WorkflowError(ValueError):
    """A workflow file or definition is wrong; the message names the file and the fix."""


def parse_workflow(data: Any, source: str = "<inline>") -> WorkflowSpec:
    if not isinstance(data, dict):
        raise WorkflowError(f"{source}: a workflow is a mapping with `name` and `steps`")
    try:
        spec = WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(error_lines(exc, root="workflow"))
        raise WorkflowError(f"{source}: invalid workflow: {problems}") from None
    check_workflow(spec, source)
    return spec


def check_workflow(spec: WorkflowSpec, source: str = "<inline>") -> None:
    """Check what the model cannot: references and contracts."""
    load_contract_modules()
    names = [s.name for s in spec.steps]
    for index, step in enumerate(spec.steps):
        for ref in references(step.input):
            head = ref.split(".")
            if head[0] not in ("input", "intent", "steps"):
                raise WorkflowError(
                    f"{source}: step {step.name!r} input reference ${ref} must start with "
                    "$input, $intent or $steps"
                )
            if head[0] == "steps":
                if len(head) < 3 or head[2] != "output":
                    raise WorkflowError(
                        f"{source}: step {step.name!r} reference ${ref} must look like "
                        "$steps.<step>.output[.<field>...]"
                    )
                if head[1] not in names[:index]:
                    raise WorkflowError(
                        f"{source}: step {step.name!r} refers to step {head[1]!r}, which is "
                        "not declared before it"
                    )
        if step.contract:
            try:
                resolve_contract(step.contract)
            except UnknownContractError as exc:
                raise WorkflowError(f"{source}: step {step.name!r}: {exc}") from None
    for ref in references(spec.output):
        head = ref.split(".")
        if head[0] == "steps" and (len(head) < 2 or head[1] not in names):
            raise WorkflowError(f"{source}: workflow output refers to unknown step ${ref}")


def load_workflow_file(path: Path) -> WorkflowSpec:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise WorkflowError(f"cannot read workflow file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise WorkflowError(f"{path} is not valid YAML: {exc}") from None
    return parse_workflow(data, str(path))


def builtin_workflows() -> dict[str, WorkflowSpec]:
    load_contract_modules()
    found: dict[str, WorkflowSpec] = {}
    # Files beside the module, not importlib.resources: its reader rejects editable installs
    # that map a folder to a differently named package (Python 3.11).
    for path in sorted(Path(__file__).with_name("workflows").glob("*.yaml")):
        spec = load_workflow_file(path)
        found[spec.name] = spec
    return found


class WorkflowCatalog:
    """Workflows the coordinator can start by name: built-in ones and `<home>/workflows/*.yaml`."""

    def __init__(self, extra_dirs: list[Path] | None = None) -> None:
        self._specs = builtin_workflows()
        for folder in extra_dirs or []:
            if folder.is_dir():
                for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
                    spec = load_workflow_file(path)
                    self._specs[spec.name] = spec

    def get(self, name: str) -> WorkflowSpec:
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(sorted(self._specs))
            raise WorkflowError(f"unknown workflow {name!r} (known: {known})") from None

    def names(self) -> list[str]:
        return sorted(self._specs)
