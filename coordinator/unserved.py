"""What a start or a fork answers about capabilities no live agent serves.

The run starts all the same (agents may come later), but whoever started it hears at once that
a step names a capability nobody serves (a typo, an agent not started) instead of waiting
`timeout_s × attempts` to find out. The reply's `data` carries `unserved` (capability → steps)
and `warning` (one sentence); the coordinator's log says the same, once a minute at most for
each capability. And the run's own record says so: a task still waiting, a few seconds after it
was sent, for a capability no live agent serves gets one `CapabilityUnserved` per attempt
(`unserved_facts`, decided like a timer).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Iterable
from datetime import datetime

from cairn.coordinator.domain.facts import UnservedFact
from cairn.coordinator.domain.state import STEP_DONE, RunState
from cairn.events import CommandReply
from cairn.runtime.capabilities import Liveness, unserved_warning

log = logging.getLogger("cairn.coordinator")


def steps_by_capability(state: RunState) -> dict[str, list[str]]:
    """The capabilities the run's steps still need, each with the steps that need it."""
    needed: dict[str, list[str]] = {}
    for step in state.workflow.steps:
        current = state.steps.get(step.name)
        if current is None or (current.status not in STEP_DONE and current.status != "failed"):
            needed.setdefault(step.capability, []).append(step.name)
    return needed


class UnservedWarnings:
    """Answers starts and forks with what no live agent serves. The log names each capability
    at most once every `log_every_s` seconds: thousands of starts of a workflow nobody serves
    yet (a benchmark's idle runs) must not flood it."""

    def __init__(self, liveness: Liveness, *, log_every_s: float = 60.0) -> None:
        self.liveness = liveness
        self._log_every_s = log_every_s
        self._logged: dict[str, float] = {}

    async def warn(self, reply: CommandReply, state: RunState | None) -> CommandReply:
        """`reply` with a warning about the capabilities no live agent serves, if any."""
        if not reply.ok or state is None:
            return reply
        needed = steps_by_capability(state)
        missing = await self.liveness.unserved(needed)
        if not missing:
            return reply
        steps = {capability: needed[capability] for capability in missing}
        warning = unserved_warning(steps)
        now = time.monotonic()
        if any(now - self._logged.get(c, -math.inf) >= self._log_every_s for c in missing):
            self._logged.update(dict.fromkeys(missing, now))
            log.warning("run %s: %s", state.run_id, warning)
        return reply.model_copy(update={"data": {"unserved": steps, "warning": warning}})


def waiting_capabilities(runs: Iterable[RunState]) -> set[str]:
    """The capabilities of the tasks the runs have dispatched and wait for."""
    return {
        state.workflow.step(step.name).capability
        for state in runs
        for step in state.steps.values()
        if step.status == "dispatched"
    }


def unserved_facts(
    runs: Iterable[RunState], unserved: Collection[str], at: datetime, grace_s: float
) -> list[UnservedFact]:
    """A fact for each task sent at least `grace_s` ago to a capability in `unserved` and not
    recorded as waiting yet (an agent just starting is given that long to take it)."""
    facts = []
    for state in runs:
        for step in state.steps.values():
            if step.status != "dispatched" or step.unserved_attempt == step.attempt:
                continue
            capability = state.workflow.step(step.name).capability
            sent = step.dispatched_at
            if capability not in unserved or sent is None or (at - sent).total_seconds() < grace_s:
                continue
            fact = UnservedFact(
                run_id=state.run_id,
                step=step.name,
                attempt=step.attempt,
                capability=capability,
                at=at,
            )
            facts.append(fact)
    return facts
