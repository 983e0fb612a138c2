"""Tamper evidence: checking each run's hash chain over its events as stored, and the signed
checkpoints that anchor where every chain, and the store, ends.

Each event records `prev_hash`, the hash of the run's event before it (`""` for the first):
SHA-256 over the event's topic (type and version) and every stored field, so an edit, a type
flip, a deletion or a reordering of stored events breaks a link. Runs written before links
covered the topic keep those older links below the `chain_from` their checkpoint records. The
check works on the stored bytes, not on decoded events, so it holds across upgrades that upcast
old versions.

A chain alone cannot show a cut tail, a deleted run or a chain recomputed after an edit; the
checkpoints (`cairn.runtime.eventlog.checkpoints`), signed with the store's key in the same
transaction as each append, can: each run's last seq and head hash, and the store's count of
runs and sum of their heads. Outputs the store keeps apart (by content hash) are part of the
event they were taken from: the rows checked here have them put back, and one whose bytes no
longer match its hash, or that is missing, is a broken link of that event.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cairn.events import decode_event
from cairn.events.codec import legacy_link_hash, link_hash, parse_topic
from cairn.events.validation import problem_line
from cairn.runtime.eventlog.checkpoints import (
    EMPTY,
    STORE_ROW,
    ChainKey,
    Checkpoint,
    store_head_of,
)
from cairn.runtime.eventlog.store import EventStore, StoredRow, StoreUnavailableError

ProblemKind = Literal["link", "gap", "start", "unreadable", "checkpoint", "store"]


@dataclass(frozen=True)
class ChainProblem:
    """One broken place in a run's chain. For a `link`, `expected` is the hash of the event
    before and `found` the `prev_hash` this event recorded; for an output kept apart (`blob`
    names where it belongs), the hash it was stored under and the hash of its bytes now (""
    when it is missing). A `checkpoint` problem is where the run's events and its signed head
    disagree; a `store` problem is about the store as a whole (run id `STORE_ROW`)."""

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
    # The first seq whose link covers the event's topic (1: every link does).
    chain_from: int = 1
    last_seq: int = 0  # the run's last stored event

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def is_store(self) -> bool:
        """A report about the store as a whole, not one run."""
        return self.run_id == STORE_ROW


def check_chain(
    run_id: uuid.UUID, rows: Sequence[StoredRow], chain_from: int | None = None
) -> ChainReport:
    """Check one run's stored events (in the order of their positions) link up from 1 to n.

    `chain_from`: the first seq whose link must cover the topic, as the run's checkpoint
    records it; below it links are of the older kind. None (a history from a file): either
    kind is taken, but once a link covers the topic every later one must, and the report says
    where that began."""
    problems: list[ChainProblem] = []

    def problem(seq: int, kind: ProblemKind, message: str, **details: str) -> None:
        problems.append(ChainProblem(run_id, seq, kind, message, **details))

    # The links the next event may record: (current kind, older kind); None: not computable.
    expected: tuple[str, str] | None = ("", "")
    previous = 0
    learned = 1  # without `chain_from`: where the trailing run of current links began
    seen_current = False
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
        found = str(data.get("prev_hash", ""))
        if linked and expected is not None:
            current, older = expected
            if chain_from is not None:
                ok = found == (current if row.seq >= chain_from else older)
            elif found == current:
                ok = True
                seen_current = seen_current or row.seq > 1
            else:
                ok = found == older and not seen_current
                if ok:
                    learned = row.seq + 1  # an older link: the current kind begins after it
            if not ok:
                what = (
                    "the first event must link to nothing"
                    if row.seq == 1
                    else f"event {row.seq - 1} or event {row.seq} was changed, moved or replaced"
                )
                problem(
                    row.seq,
                    "link",
                    f"event {row.seq} does not link to the event before it ({what})",
                    expected=current if row.seq >= (chain_from or 1) else older,
                    found=found,
                )
        try:
            decode_event(row.topic, row.state, run_id, row.seq)
        except ValueError as exc:
            why = problem_line(exc)
            problem(row.seq, "unreadable", f"event {row.seq} ({name}) does not decode: {why}")
        expected = (
            link_hash(row.topic, data, run_id, row.seq),
            legacy_link_hash(data, run_id, row.seq),
        )
    head = expected[0] if expected is not None else ""
    return ChainReport(
        run_id,
        len(rows),
        head,
        problems,
        chain_from if chain_from is not None else learned,
        previous,
    )


def verify_store(store: EventStore, runs: Sequence[uuid.UUID] | None = None) -> list[ChainReport]:
    """Check the chains of the given runs, or of every stream in the store (started or not),
    against their signed checkpoints; with every run checked, also the store's own head (a
    report for `STORE_ROW` when it is wrong, and one for each run that has a checkpoint but no
    events left)."""
    checkpoints = store.checkpoints()
    key: ChainKey | None
    try:
        key = store.chain_key() if checkpoints else None
    except StoreUnavailableError as exc:
        key, no_key = None, str(exc)
    else:
        no_key = ""
    everything = runs is None
    run_ids = list(runs) if runs is not None else store.run_ids(started_only=False)
    reports = [
        _check_run(run_id, store.rows(run_id), checkpoints.get(run_id), key) for run_id in run_ids
    ]
    if not everything:
        return reports
    present = set(run_ids)
    for run_id, checkpoint in checkpoints.items():
        if run_id != STORE_ROW and run_id not in present:
            reports.append(
                ChainReport(
                    run_id,
                    0,
                    "",
                    [
                        ChainProblem(
                            run_id,
                            checkpoint.head.seq,
                            "checkpoint",
                            f"the run is signed with {checkpoint.head.seq} events but none is "
                            "in the store: it was deleted",
                        )
                    ],
                )
            )
    store_problems = _check_store(checkpoints, key, no_key, bool(run_ids))
    if store_problems:
        reports.append(ChainReport(STORE_ROW, 0, "", store_problems))
    return reports


def _check_run(
    run_id: uuid.UUID,
    rows: Sequence[StoredRow],
    checkpoint: Checkpoint | None,
    key: ChainKey | None,
) -> ChainReport:
    chain_from = checkpoint.head.chain_from if checkpoint is not None else None
    report = check_chain(run_id, rows, chain_from)
    problems = list(report.problems)

    def problem(seq: int, message: str, **details: str) -> None:
        problems.append(ChainProblem(run_id, seq, "checkpoint", message, **details))

    last = max((r.seq for r in rows), default=0)
    if checkpoint is None:
        problem(
            last,
            "the run has no signed checkpoint: it was written before checkpoints, added to "
            "the store behind cairn's back, or its checkpoint was removed",
        )
    else:
        signed = checkpoint.head
        if key is not None and not key.run_signed(signed, checkpoint.mac):
            problem(signed.seq, "the run's checkpoint is not signed with this store's key")
        if last < signed.seq:
            missing = (
                f"event {signed.seq} is"
                if last + 1 == signed.seq
                else f"events {last + 1} to {signed.seq} are"
            )
            problem(last, f"the run was cut short: {missing} signed but missing")
        elif last > signed.seq:
            problem(
                last,
                f"the run holds events after its signed last event {signed.seq}: "
                f"events {signed.seq + 1} to {last} were not written by cairn",
            )
        elif report.head != signed.hash:
            problem(
                last,
                f"the run's last event {last} is not the one that was signed "
                "(an edit, with the chain recomputed or at the end)",
                expected=signed.hash,
                found=report.head,
            )
    return ChainReport(
        run_id, report.events, report.head, problems, report.chain_from, report.last_seq
    )


def _check_store(
    checkpoints: Mapping[uuid.UUID, Checkpoint],
    key: ChainKey | None,
    no_key: str,
    has_runs: bool,
) -> list[ChainProblem]:
    """The runs' checkpoints against the store's signed head: each run's events are checked
    against its own checkpoint, so what is left to catch here is a run deleted whole, its
    checkpoint with it (or a checkpoint added for a run cairn never wrote)."""
    problems: list[ChainProblem] = []

    def problem(message: str) -> None:
        problems.append(ChainProblem(STORE_ROW, 0, "store", message))

    if no_key:
        problem(f"the checkpoints' signatures cannot be checked: {no_key}")
    row = checkpoints.get(STORE_ROW)
    if row is None:
        if has_runs:
            problem(
                "the store has no signed head: it was written before checkpoints, or they "
                "were removed"
            )
        return problems
    signed = store_head_of(row)
    if key is not None and not key.store_signed(signed, row.mac):
        problem("the store's head is not signed with this store's key")
    heads = [c.head for run_id, c in checkpoints.items() if run_id != STORE_ROW]
    found = EMPTY.with_heads([], heads)
    if found.runs != signed.runs:
        problem(
            f"the store's signed head counts {signed.runs} run(s), the store holds "
            f"{found.runs}: a run was deleted whole, checkpoint and all, or a checkpoint was "
            "added behind cairn's back"
        )
    elif found.total != signed.total:
        problem(
            "the runs' checkpoints do not add up to the store's signed head: a run's "
            "checkpoint was replaced by another one's"
        )
    return problems
