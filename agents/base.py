"""The agent SDK's core: the `Agent` base class and the `TaskContext` a handler receives."""

from __future__ import annotations

import inspect
import re
import uuid
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, TypeVar, get_args, get_origin

from pydantic import BaseModel

from cairn.agents import spans
from cairn.agents.errors import NonRetryableError
from cairn.agents.llm import Completion, LLMClient, llm_provider
from cairn.events import Intent, Lineage, StepSpec, TaskEnvelope, Usage
from cairn.runtime import tracing

In = TypeVar("In", bound=BaseModel)
Out = TypeVar("Out", bound=BaseModel)

# A capability is one token of a NATS subject (`cairn.task.<capability>`) and part of a
# consumer name, so it may not contain dots, wildcards or spaces.
CAPABILITY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class Agent(ABC, Generic[In, Out]):
    """An agent: one capability, typed input and output, and an async `handle`.

    Subclass it with the input and output models as type arguments; `input_model` and
    `output_model` are taken from them unless the subclass sets them::

        class Planner(Agent[PlanRequest, Plan]):
            capability = "planner"

            async def handle(self, task: PlanRequest, ctx: TaskContext) -> Plan: ...

    `handle` may raise: `NonRetryableError` for failures a retry cannot fix, anything else
    for failures that a later attempt might not hit. The worker turns both into results.
    """

    capability: ClassVar[str]
    # ClassVar cannot name the type variables; the type arguments keep `handle` typed.
    input_model: ClassVar[type[BaseModel]]
    output_model: ClassVar[type[BaseModel]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):
            if get_origin(base) is not Agent:
                continue
            models = get_args(base)
            if len(models) == 2:
                if "input_model" not in cls.__dict__ and _is_model(models[0]):
                    cls.input_model = models[0]
                if "output_model" not in cls.__dict__ and _is_model(models[1]):
                    cls.output_model = models[1]

    @abstractmethod
    async def handle(self, task: In, ctx: TaskContext) -> Out:
        """Do the work of one task and return its output."""


def _is_model(candidate: object) -> bool:
    return isinstance(candidate, type) and issubclass(candidate, BaseModel)


def check_agent(agent: Agent[Any, Any]) -> None:
    """Raise `TypeError` naming what is missing if `agent` cannot be served."""
    name = type(agent).__name__
    capability = getattr(agent, "capability", None)
    if not isinstance(capability, str) or not CAPABILITY_PATTERN.match(capability):
        raise TypeError(
            f"{name}.capability must be a name of letters, digits, '-' or '_' "
            f"(it becomes the subject cairn.task.<capability>), not {capability!r}"
        )
    for attr in ("input_model", "output_model"):
        if not _is_model(getattr(agent, attr, None)):
            raise TypeError(
                f"{name}.{attr} must be a pydantic model class: subclass Agent[In, Out] "
                f"or set {attr} on the class"
            )


class _MeteredLLM:
    """Wraps the process's LLM client so every call uses the model the task names (if any)
    and its usage lands on the task's context."""

    def __init__(self, inner: LLMClient, ctx: TaskContext) -> None:
        self._inner = inner
        self._ctx = ctx

    async def complete(
        self, system: str, prompt: str, *, max_tokens: int = 512, model: str | None = None
    ) -> Completion:
        model = model or self._ctx.model
        if model is not None and not _takes_model(self._inner):
            raise NonRetryableError(
                f"step {self._ctx.step} asks for model {model!r}, but this agent's LLM client "
                f"({type(self._inner).__name__}) cannot switch models: give its complete() a "
                "`model` parameter"
            )
        provider = llm_provider(self._inner) if tracing.ENABLED else None
        with spans.llm_span(model, provider, max_tokens) as span:
            if model is None:
                completion = await self._inner.complete(system, prompt, max_tokens=max_tokens)
            else:
                call: Any = self._inner.complete  # the protocol leaves `model` optional
                completion = await call(system, prompt, max_tokens=max_tokens, model=model)
            spans.record_completion(
                span, completion.model, completion.input_tokens, completion.output_tokens
            )
        self._ctx.report_usage(completion.model, completion.input_tokens, completion.output_tokens)
        return completion


def _takes_model(client: LLMClient) -> bool:
    try:
        parameters = inspect.signature(client.complete).parameters.values()
    except (TypeError, ValueError):
        return True  # cannot tell: let the call say
    return any(p.name == "model" or p.kind is p.VAR_KEYWORD for p in parameters)


class TaskContext:
    """Everything a handler knows about its task besides the input itself.

    - `envelope`: the whole `TaskEnvelope` (intent, lineage, step, attempt, repair, ...).
    - `llm`: the process's LLM client, using the step's `model` when it names one; its usage
      is reported with the result automatically.
    - `report_usage(...)`: report other metered model use (a second client, an embedding call).
    - `agent_id`: this worker's id, `<capability>-<random>`.
    - `delivery`: how often NATS has delivered this task message (above 1: a redelivery,
      e.g. after another replica died holding it).
    """

    def __init__(
        self,
        envelope: TaskEnvelope,
        *,
        llm: LLMClient,
        agent_id: str,
        delivery: int = 1,
    ) -> None:
        self.envelope = envelope
        self.agent_id = agent_id
        self.delivery = delivery
        self.llm: LLMClient = _MeteredLLM(llm, self)
        self._usage: dict[str, list[int]] = {}
        self.review: str | None = None
        self.proposals: list[StepSpec] = []

    @property
    def task_id(self) -> str:
        return self.envelope.task_id

    @property
    def run_id(self) -> uuid.UUID:
        return self.envelope.run_id

    @property
    def step(self) -> str:
        return self.envelope.step

    @property
    def attempt(self) -> int:
        return self.envelope.attempt

    @property
    def intent(self) -> Intent:
        return self.envelope.intent

    @property
    def lineage(self) -> list[Lineage]:
        return self.envelope.lineage

    @property
    def model(self) -> str | None:
        """The model the step asks for instead of the agent's default; None: the default."""
        return self.envelope.model

    @property
    def repair(self) -> list[str]:
        """Why the previous attempt's output broke its contract; empty on a first attempt."""
        return self.envelope.repair

    def report_usage(self, model: str, input_tokens: int, output_tokens: int) -> None:
        """Add metered model use to this task's result (summed per model)."""
        if not model:
            raise ValueError("report_usage needs the model's name")
        if input_tokens < 0 or output_tokens < 0:
            raise ValueError(
                f"report_usage: token counts cannot be negative ({input_tokens}, {output_tokens})"
            )
        totals = self._usage.setdefault(model, [0, 0])
        totals[0] += input_tokens
        totals[1] += output_tokens

    def request_review(self, note: str) -> None:
        """Ask for a person to look at this output before the run uses it (the coordinator
        opens an approval gate; the note tells the reviewer what to look at)."""
        self.review = note or "the agent asked for a review"

    def propose(self, step: StepSpec) -> None:
        """Propose a follow-up step; the coordinator admits it only if this step may propose
        and the run's limits and budget allow."""
        self.proposals.append(step)

    @property
    def usage(self) -> list[Usage]:
        """Usage reported so far, one entry per model, in the order models were first used."""
        return [
            Usage(model=model, input_tokens=tokens[0], output_tokens=tokens[1])
            for model, tokens in self._usage.items()
        ]
