"""Who may answer a task: a result is decided only when it comes from whom its task was sent
to, on the subject of the step's capability (which only that capability's NATS user may
publish on) and carrying back the task's key (derived from the store's key, never stored).

Not a rule of the run (that is `domain/`): an authentication at the door, which replay has no
need of, since what it replays was admitted when it was recorded.
"""

from __future__ import annotations

from cairn.coordinator.domain.facts import Rejected, task_id
from cairn.coordinator.domain.state import RunState
from cairn.coordinator.verdicts import Received
from cairn.runtime.eventlog.checkpoints import ChainKey


def admit(state: RunState, item: Received, keys: ChainKey) -> None:
    """Refuse (`Rejected`) a result for a dispatched task that does not come from whom the task
    was sent to: on another capability's subject, or without the task's key. A result for no
    dispatched task is left to `decide`, which says why."""
    result = item.result
    step = state.steps.get(result.step)
    if (
        step is None
        or not 1 <= result.attempt <= step.attempt
        or result.task_id != task_id(state.run_id, result.step, result.attempt)
    ):
        return
    capability = state.workflow.step(result.step).capability
    if item.capability != capability:
        came = f"{item.capability}'s subject" if item.capability else "no capability's subject"
        raise Rejected(
            f"result for step {result.step} came on {came}: only {capability} agents may answer it"
        )
    if not keys.task_key_matches(result.task_id, result.task_key):
        raise Rejected(
            f"result for task {result.task_id} does not carry the task_key its task was sent "
            "with: a result must answer the task it was given"
        )
