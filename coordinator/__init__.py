"""The coordinator process: it takes commands and agent results, decides what follows with the
pure rules in `domain/`, commits the decisions to the event log (`engine`), publishes what they
call for (`outbox`), and serves all of it on NATS (`service`, run by `python -m
cairn.coordinator`). `history/` holds what reads a run's record back: verify, export and
import, replay, diff.

Importing this package loads nothing: take what you need from its modules.
"""

__all__: list[str] = []
