"""Tamper evidence: checking a run's hash chain over its events as stored.

Each event records `prev_hash`, the hash of the run's event before it (`""` for the first), so an
edit, a deletion or a reordering of stored events breaks a link. The check works on the stored
bytes, not on decoded events, so it holds across upgrades that upcast old versions.

Outputs the store keeps apart (by content hash) are part of the event they were taken from: the
rows checked here have them put back, and one whose bytes no longer match its hash, or that is
missing, is a broken link of that event.

A chain cannot show an edit of its *last* event (nothing links to it yet); `head` is that hash,
to be kept somewhere else (an export's header records it) when the tail must be protected too.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from cairn.events import decode_event
from cairn.events.codec import link_hash, parse_topic
from cairn.runtime.eventlog.store import EventStore, StoredRow

ProblemKind = Literal["link", "gap", "start", "unreadable"]


@dataclass(frozen=True)
class ChainProblem:
    """One broken place in a run's chain. For a `link`, `expected` is the hash of the event
    before and `found` the `prev_hash` this event recorded; for an output kept apart (`blob`
    names where it belongs), the hash it was stored under and the hash of its bytes now (""
    when it is missing)."""

    run_id: uuid.UUID
    seq: int
    kind: ProblemKind
    message: str
    expected: str | None = None
    found: str | None = None
    blob: str | None = None


@dataclass(frozen=True)
class ChainReport:
    run_id: uuid.UUID
    events: int
    head: str  # the hash of the last event: what the next one will link to
    problems: list[ChainProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_chain(run_id: uuid.UUID, rows: Sequence[StoredRow]) -> ChainReport:
    """Check one run's stored events (in the order of their positions) link up from 1 to n."""
    problems: list[ChainProblem] = []

    def problem(seq: int, kind: ProblemKind, message: str, **details: str) -> None:
        problems.append(ChainProblem(run_id, seq, kind, message, **details))

    expected: str | None = ""  # the hash the next event must record; None: not computable
    previous = 0
    for row in sorted(rows, key=lambda r: r.seq):
        linked = True
        if row.seq != previous + 1:
            linked = False
            if previous == 0:
                problem(
                    row.seq,
                    "start",
                    f"the run's first stored event is {row.seq}: "
                    f"event{'s 1 to' if row.seq > 2 else ''} {row.seq - 1} "
                    f"{'are' if row.seq > 2 else 'is'} missing",
                )
            else:
                missing = (
                    f"event {previous + 1} is"
                    if row.seq == previous + 2
                    else f"events {previous + 1} to {row.seq - 1} are"
                )
                problem(row.seq, "gap", f"{missing} missing before event {row.seq}")
        previous = row.seq
        try:
            name, _ = parse_topic(row.topic)
            data = json.loads(row.state)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            problem(row.seq, "unreadable", f"event {row.seq} cannot be read: {exc}")
            expected = None
            continue
        for broken in row.broken:
            problem(
                row.seq,
                "link",
                f"event {row.seq} ({name}): {broken.message}",
                expected=broken.expected,
                found=broken.found or "",
                blob=broken.path,
            )
        if row.seq == 1 and name != "RunStarted":
            problem(row.seq, "start", f"the run's first event is {name}, not RunStarted")
        found = data.get("prev_hash", "")
        if linked and expected is not None and found != expected:
            what = (
                "the first event must link to nothing"
                if row.seq == 1
                else f"event {row.seq - 1} or event {row.seq} was changed, moved or replaced"
            )
            problem(
                row.seq,
                "link",
                f"event {row.seq} does not link to the event before it ({what})",
                expected=expected,
                found=str(found),
            )
        try:
            decode_event(row.topic, row.state, run_id, row.seq)
        except ValueError as exc:
            problem(row.seq, "unreadable", f"event {row.seq} ({name}) does not decode: {exc}")
        expected = link_hash(data, run_id, row.seq)
    return ChainReport(run_id, len(rows), expected or "", problems)


def verify_store(store: EventStore, runs: Sequence[uuid.UUID] | None = None) -> list[ChainReport]:
    """Check the chains of the given runs, or of every stream in the store (started or not)."""
    run_ids = list(runs) if runs is not None else store.run_ids(started_only=False)
    return [check_chain(run_id, store.rows(run_id)) for run_id in run_ids]
