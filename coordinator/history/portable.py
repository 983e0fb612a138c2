"""A run's history as a portable file (JSON lines), and reading one back.

The first line is a header: `{"format": "cairn-run-history", "version": 1, "run_id": ...,
"events": n, "last_hash": ...}`; then one line per event, `{"type": "Name@version", "seq": n,
"event": {...}}`, where `event` is the event exactly as stored (its version is not upcast, so the
file's hash chain is the store's). Every line is canonical JSON, so one run always exports to the
same bytes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from cairn.coordinator.domain.state import EvolveError, RunState, fold
from cairn.coordinator.history.verify import check_chain
from cairn.events import Event, canonical_json, decode_event
from cairn.events.codec import legacy_link_hash, link_hash
from cairn.events.validation import problem_line
from cairn.runtime.eventlog.store import ConcurrencyError, EventStore, StoredRow

FORMAT = "cairn-run-history"
FORMAT_VERSION = 1


class PortableError(ValueError):
    """An exported history cannot be read or imported; the message names the line and why."""


@dataclass(frozen=True)
class PortableHistory:
    """A validated history: its rows as stored, the decoded events and the state they fold to."""

    run_id: uuid.UUID
    rows: list[StoredRow]
    events: list[Event]
    state: RunState
    chain_from: int = 1  # the first seq whose link covers the topic (older files: later)


def export_lines(run_id: uuid.UUID, rows: list[StoredRow]) -> Iterator[bytes]:
    """The file's lines (each ending in a newline) for a run's stored rows."""
    ordered = sorted(rows, key=lambda r: r.seq)
    objects = [json.loads(r.state) for r in ordered]
    last = link_hash(ordered[-1].topic, objects[-1], run_id, ordered[-1].seq) if ordered else ""
    yield (
        canonical_json(
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "run_id": str(run_id),
                "events": len(ordered),
                "last_hash": last,
            }
        )
        + b"\n"
    )
    for row, data in zip(ordered, objects, strict=True):
        yield canonical_json({"type": row.topic, "seq": row.seq, "event": data}) + b"\n"


def read_history(lines: Iterable[str | bytes], source: str = "<file>") -> PortableHistory:
    """Parse and check an exported history: every line decodes, seqs run 1..n, the hash chain is
    intact and ends at the header's `last_hash`, and the events fold into a run."""
    it = iter(lines)
    header = _json_line(next(it, b""), source, 1)
    if header.get("format") != FORMAT:
        raise PortableError(f"{source}: line 1 is not a {FORMAT} header")
    version = header.get("version")
    if not isinstance(version, int) or version < 1:
        raise PortableError(f"{source}: the header has no valid format version")
    if version > FORMAT_VERSION:
        raise PortableError(
            f"{source} is format version {version}, newer than this cairn's {FORMAT_VERSION}: "
            "upgrade cairn to import it"
        )
    try:
        run_id = uuid.UUID(str(header.get("run_id")))
    except ValueError:
        raise PortableError(f"{source}: the header's run_id is not a UUID") from None
    count = header.get("events")
    last_hash = header.get("last_hash")
    if not isinstance(count, int) or not isinstance(last_hash, str):
        raise PortableError(f"{source}: the header needs `events` (a number) and `last_hash`")

    rows: list[StoredRow] = []
    events: list[Event] = []
    for number, raw in enumerate(it, start=2):
        if not raw.strip():
            continue
        line = _json_line(raw, source, number)
        topic, seq, data = line.get("type"), line.get("seq"), line.get("event")
        if set(line) != {"type", "seq", "event"} or not (
            isinstance(topic, str) and isinstance(seq, int) and isinstance(data, dict)
        ):
            raise PortableError(
                f"{source}: line {number} must be "
                '{"type": "Name@version", "seq": n, "event": {...}}'
            )
        if seq != len(rows) + 1:
            raise PortableError(
                f"{source}: line {number} holds event {seq}, expected {len(rows) + 1} "
                "(events must run 1..n in order)"
            )
        row = StoredRow(run_id, seq, topic, canonical_json(data))
        try:
            events.append(decode_event(topic, row.state, run_id, seq))
        except ValueError as exc:
            raise PortableError(
                f"{source}: line {number} ({topic}) does not decode: {problem_line(exc)}"
            ) from None
        rows.append(row)
    if len(rows) != count:
        raise PortableError(f"{source}: the header says {count} events, the file holds {len(rows)}")
    if not rows:
        raise PortableError(f"{source} holds no events")
    chain = check_chain(run_id, rows)
    if not chain.ok:
        first = chain.problems[0]
        raise PortableError(
            f"{source}: the hash chain is broken at event {first.seq}: {first.message}"
        )
    legacy = legacy_link_hash(json.loads(rows[-1].state), run_id, rows[-1].seq)
    if last_hash not in (chain.head, legacy):
        raise PortableError(
            f"{source}: the last event hashes to {chain.head}, the header says {last_hash} "
            "(the last event or the header was changed)"
        )
    try:
        state = fold(events)
    except EvolveError as exc:
        raise PortableError(f"{source}: the events do not make a run: {exc}") from None
    assert state is not None
    return PortableHistory(run_id, rows, events, state, chain.chain_from)


def import_history(
    store: EventStore, history: PortableHistory, *, allow_unfinished: bool = False
) -> list[int]:
    """Append a checked history to the store in one transaction; nothing is written on error."""
    if store.has_run(history.run_id):
        raise PortableError(f"run {history.run_id} is already in the event store")
    if not history.state.terminal and not allow_unfinished:
        raise PortableError(
            f"run {history.run_id} is still {history.state.status} in this history: a coordinator "
            "that restarts on this store would take it over and dispatch its tasks. Import it into "
            "a separate store (CAIRN_STORE=...), or pass --allow-unfinished"
        )
    try:
        return store.append_rows(history.rows, {history.run_id: history.chain_from})
    except ConcurrencyError:
        raise PortableError(f"run {history.run_id} was written to the store meanwhile") from None


def _json_line(raw: str | bytes, source: str, number: int) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise PortableError(f"{source}: line {number} is not JSON: {exc}") from None
    except RecursionError:
        raise PortableError(f"{source}: line {number} nests deeper than JSON read here") from None
    if not isinstance(value, dict):
        raise PortableError(f"{source}: line {number} is not a JSON object")
    return value
