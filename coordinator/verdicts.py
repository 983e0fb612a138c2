"""What the engine is given and what it answers: a result as it came off the wire, the verdict
on it (what its message's owner must do with it: ack, dead-letter, hand back), and the counts
the coordinator reports on `cairn.cmd.ping`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from cairn.events import TaskResult


@dataclass
class Stats:
    """What this coordinator has done since it started."""

    results: int = 0
    batches: int = 0
    events: int = 0
    conflicts: int = 0
    timers_fired: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


class Received(NamedTuple):
    """A result as it came off the wire: the validated message, its headers (trace context),
    and the capability whose subject it came on (only that capability's agents may publish
    there; None for a subject of another shape)."""

    result: TaskResult
    headers: Mapping[str, str] | None
    capability: str | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What became of one result: `decided` (its decision is committed and published: ack it),
    `refused` (it belongs to no dispatched task: dead-letter it with `reason`, then ack), or
    `again` (another writer moved its run first: hand it back to be decided anew)."""

    outcome: Literal["decided", "refused", "again"]
    reason: str = ""

    @staticmethod
    def refuse(reason: str) -> Verdict:
        return Verdict("refused", reason)


DECIDED = Verdict("decided")
AGAIN = Verdict("again")
