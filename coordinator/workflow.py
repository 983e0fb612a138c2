"""Workflow definitions: loading them from YAML, checking what the model cannot (references
and contracts), and the catalog the coordinator starts runs from. How a step's input mapping
is resolved is pure and lives in `domain/mapping.py`.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for
from pydantic import ValidationError

from cairn.coordinator.domain.mapping import references
from cairn.events import WorkflowSpec, error_lines, error_location
from cairn.events.contracts import UnknownContractError, known_contracts, resolve_contract

log = logging.getLogger("cairn.coordinator")

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
    if spec.input_schema is not None:
        check_input_schema(spec.input_schema, source)


def check_input_schema(schema: str | dict[str, Any], source: str) -> None:
    """Refuse a workflow whose input schema names no registered model or is no JSON Schema."""
    if isinstance(schema, str):
        try:
            resolve_contract(schema)
        except UnknownContractError:
            known = ", ".join(known_contracts()) or "none"
            raise WorkflowError(
                f"{source}: input_schema {schema!r} names no registered model (known: {known}); "
                "register one with @contract or add its module to CAIRN_CONTRACTS"
            ) from None
        return
    try:
        validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as exc:
        where = error_location(exc.absolute_path, "(root)")
        raise WorkflowError(
            f"{source}: input_schema is not a valid JSON Schema at {where}: {exc.message}"
        ) from None


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
    """Workflows the coordinator can start by name: built-in ones and `<home>/workflows/*.yaml`
    (which win over a built-in of the same name).

    The folders are looked at again when a name is asked for that the catalog does not hold,
    and otherwise at most every `recheck_s` seconds: a file added, changed or removed while
    the coordinator runs counts from the next start on. A file that does not load is reported
    by name (in the log, once per change, and in the error of a start that names it) and the
    others load all the same: one broken file never stops the coordinator."""

    def __init__(self, extra_dirs: list[Path] | None = None, *, recheck_s: float = 1.0) -> None:
        self._builtin = builtin_workflows()
        self._dirs = list(extra_dirs or [])
        self._recheck_s = recheck_s
        self._checked_at = -math.inf
        self._stamps: dict[Path, tuple[int, int, int]] = {}
        self._loaded: dict[Path, WorkflowSpec] = {}
        self.broken: dict[Path, str] = {}  # a file that does not load, and why
        self._specs = dict(self._builtin)
        self.refresh(force=True)

    def refresh(self, *, force: bool = False) -> None:
        """Load what changed in the folders since the last look (every `recheck_s` at most,
        unless `force`)."""
        now = time.monotonic()
        if not force and now - self._checked_at < self._recheck_s:
            return
        self._checked_at = now
        stamps: dict[Path, tuple[int, int, int]] = {}
        for folder in self._dirs:
            try:
                paths = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
            except OSError:
                continue
            for path in paths:
                try:
                    info = path.stat()
                except OSError:
                    continue  # removed between the listing and now
                stamps[path] = (info.st_mtime_ns, info.st_size, info.st_ino)
        if stamps == self._stamps:
            return
        for path, stamp in stamps.items():
            if self._stamps.get(path) != stamp:
                self._load(path)
        for gone in set(self._stamps) - set(stamps):
            self._loaded.pop(gone, None)
            self.broken.pop(gone, None)
        self._stamps = stamps
        specs = dict(self._builtin)
        for path in sorted(self._loaded):
            specs[self._loaded[path].name] = self._loaded[path]
        self._specs = specs

    def _load(self, path: Path) -> None:
        try:
            spec = load_workflow_file(path)
        except WorkflowError as exc:
            self._loaded.pop(path, None)
            self.broken[path] = str(exc)
            log.error("workflow file %s is not loaded: %s", path, exc)
            return
        self.broken.pop(path, None)
        self._loaded[path] = spec

    def get(self, name: str) -> WorkflowSpec:
        self.refresh()
        spec = self._specs.get(name)
        if spec is None:
            self.refresh(force=True)  # a file added just now
            spec = self._specs.get(name)
        if spec is not None:
            return spec
        for path, problem in self.broken.items():
            if path.stem == name:
                raise WorkflowError(f"workflow {name!r} is not loaded: {problem}")
        known = ", ".join(sorted(self._specs))
        files = ", ".join(sorted(p.name for p in self.broken))
        unread = f"; not loaded, see the coordinator's log: {files}" if files else ""
        raise WorkflowError(f"unknown workflow {name!r} (known: {known}{unread})")

    def names(self) -> list[str]:
        self.refresh()
        return sorted(self._specs)
