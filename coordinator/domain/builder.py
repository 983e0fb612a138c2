"""Building a decision's events. Each event gets the run's next `seq`, the hash of the event
before it and the run's trace, and is folded into the decision's own copy of the state as it is
added: the rules deciding the rest see it, and nobody folds it a second time.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from cairn.coordinator.domain.facts import Policy
from cairn.coordinator.domain.state import RunState, evolve
from cairn.events import Event

# The actor of what the coordinator decides by its own rules.
COORDINATOR = "coordinator"


class Decided(list[Event]):
    """A decision's events, with the run's state right after them (folded while deciding)."""

    state: RunState | None = None


class Decision:
    """One decision under way: the events so far, the state they lead to, and the time and
    policy of the fact being decided."""

    def __init__(
        self, state: RunState | None, run_id: uuid.UUID, at: datetime, policy: Policy
    ) -> None:
        self.state = state
        self.run_id = run_id
        self.at = at
        self.policy = policy
        self.events = Decided()
        # Set aside from the tenant's allowance by this decision so far: the allowance was
        # given before the decision began.
        self.tenant_reserved = Decimal(0)

    @property
    def next_seq(self) -> int:
        return (self.state.version if self.state else 0) + 1

    def emit(self, cls: type[Event], **fields: Any) -> None:
        """Add an event of type `cls` with `fields`, chained after the last one."""
        state = self.state
        if state is not None and state.trace_id is not None:
            fields["trace_id"] = state.trace_id  # from the record, so replay stamps the same
        event = cls(
            run_id=self.run_id,
            seq=self.next_seq,
            at=self.at,
            prev_hash=state.last_hash if state else "",
            **fields,
        )
        self.state = self.events.state = evolve(self.state, event)
        self.events.append(event)

    @property
    def run(self) -> RunState:
        """The run as the events so far leave it (the run has started)."""
        assert self.state is not None
        return self.state
