"""Workflow definitions as recorded data.

A run records the whole definition it was started with (in RunStarted), so its history can be
replayed and audited without the YAML file it came from.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from cairn.events.base import Frozen, unset_none

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


RetryCause = Literal["error", "timeout", "contract"]
ALL_CAUSES: tuple[RetryCause, ...] = ("error", "timeout", "contract")


class RetryPolicy(Frozen):
    """How often a step may be tried (counting the first attempt), after which failures, and how
    long to wait before each retry: `backoff_s × multiplier^(retry-1)`, capped at
    `max_backoff_s`, then spread by ±`jitter` (a fraction) so retries do not arrive in step."""

    max_attempts: int = Field(default=3, ge=1, le=100)
    backoff_s: float = Field(default=0.5, ge=0, le=3600)
    multiplier: float = Field(default=2.0, ge=1, le=10)
    max_backoff_s: float = Field(default=30.0, ge=0, le=86400)
    jitter: float = Field(default=0.2, ge=0, le=1)
    # Which failures are worth another attempt. An agent's error also says whether it is
    # retryable; both must agree.
    retry_on: list[RetryCause] = Field(default_factory=lambda: list(ALL_CAUSES))


WEEK_S = 7 * 24 * 3600


class ApprovalPolicy(Frozen):
    """When a person must look before the step goes on, and what happens if nobody does.

    A gate opens before the step when `before` is set, or when the step's cost estimate is over
    `cost_over_usd`; after it when the agent flags its output for review (`on_flag`). The
    request goes to `approvers`; when it is not decided within `timeout_s` it moves to the next
    group of `escalate_to` (with `on_expiry: escalate`), and in the end expires: `deny` treats
    that as a refusal of the step, `fail` fails the run. Expiry is recorded as expiry, never as a
    denial."""

    before: bool = False
    cost_over_usd: Decimal | None = Field(default=None, ge=0)
    on_flag: bool = True
    approvers: str = "approvers"
    timeout_s: float = Field(default=3600.0, gt=0, le=WEEK_S)
    warn_before_s: float | None = Field(default=None, gt=0, le=WEEK_S)
    escalate_to: list[str] = Field(default_factory=list)
    on_expiry: Literal["deny", "fail", "escalate"] = "fail"


class StepSpec(Frozen):
    """One declared step: which capability does it, with what input, under which contract."""

    name: str = Field(pattern=NAME_PATTERN)
    capability: str = Field(pattern=NAME_PATTERN)
    # Input mapping: literal values, or references such as "$input.topic",
    # "$steps.plan.output.outline", "$intent.goal" resolved when the step is dispatched.
    input: dict[str, Any] = Field(default_factory=dict)
    needs: list[str] | None = None  # default: the step declared before this one
    contract: str | None = None  # output contract "Name@version"
    retry: RetryPolicy = RetryPolicy()
    timeout_s: float = Field(default=120.0, gt=0, le=WEEK_S)
    # When the step has failed for good: fail the run, skip the step and go on (later steps
    # that refer to its output then need a `??` default), or ask a person whether to try again.
    on_failure: Literal["fail", "skip", "ask"] = "fail"
    approval: ApprovalPolicy | None = None
    # May the agent propose follow-up steps? The coordinator admits them within the run's limits.
    may_propose: bool = False
    # What one attempt is expected to cost; reserved from the run's budget before dispatch.
    cost_estimate_usd: Decimal | None = Field(default=None, ge=0)
    # The model the agent should use for this step instead of its default (sent in the task).
    model: str | None = Field(default=None, min_length=1, max_length=200)


class RunLimits(Frozen):
    """Guards against runs that loop: steps in all (declared and admitted), attempts in all."""

    max_steps: int = Field(default=50, ge=1, le=10_000)
    max_attempts: int = Field(default=200, ge=1, le=100_000)


class WorkflowSpec(Frozen):
    """A named, versioned list of steps."""

    name: str = Field(pattern=NAME_PATTERN)
    version: int = Field(default=1, ge=1)
    description: str = ""
    steps: list[StepSpec] = Field(min_length=1)
    # What the run returns; a reference like the step inputs. Default: the last step's output.
    output: Any = None
    limits: RunLimits = RunLimits()
    # What a run's input must look like, checked before the run is started: a registered
    # model by name and version ("ReportInput@1", as output contracts are named) or a JSON
    # Schema. Left out of the encoding while unset, so workflows without one record as before.
    input_schema: Annotated[str, Field(max_length=200)] | dict[str, Any] | None = unset_none()

    @field_validator("steps")
    @classmethod
    def _unique_names(cls, steps: list[StepSpec]) -> list[StepSpec]:
        seen: set[str] = set()
        for step in steps:
            if step.name in seen:
                raise ValueError(f"step name {step.name!r} is used twice")
            seen.add(step.name)
        return steps

    @model_validator(mode="after")
    def _needs_exist(self) -> WorkflowSpec:
        names = [s.name for s in self.steps]
        for step in self.steps:
            for need in step.needs or []:
                if need not in names:
                    raise ValueError(f"step {step.name!r} needs unknown step {need!r}")
                if names.index(need) >= names.index(step.name):
                    raise ValueError(
                        f"step {step.name!r} needs {need!r}, which is declared after it"
                    )
        return self

    def step(self, name: str) -> StepSpec:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def needs_of(self, name: str) -> list[str]:
        names = [s.name for s in self.steps]
        step = self.step(name)
        if step.needs is not None:
            return list(step.needs)
        index = names.index(name)
        return [names[index - 1]] if index > 0 else []
