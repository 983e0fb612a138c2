"""Large payloads kept apart from the events that carry them, stored once by content hash.

An agent's output can run to many kilobytes, and it travels on: in its result, as the next
task's input, in the run's output. The event store keeps each such value over a size threshold
once, keyed by the SHA-256 of its canonical JSON (for an output, the `output_hash` the run's
events record), and the stored event holds a reference in its place. Readers never see the
references: the store puts the values back as it reads, so decisions, the hash chain, replay and
export all see each event as it was decided.

The stored form of an event with references begins `{"$blobs":[[...path], ...]`, listing where
they are (no event field can be named `$blobs`); each place listed holds `"sha256:<hex>"`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from cairn.events import canonical_json

# The fields that hold agents' outputs or values built from them, per event type. `*` stands
# for every key of a mapping (a fork's carried outputs, by step).
PAYLOADS: dict[str, tuple[tuple[str, ...], ...]] = {
    "RunStarted": (("input",), ("carried", "*", "output")),
    "TaskDispatched": (("input",),),
    "ResultReceived": (("output",),),
    "ApprovalRequested": (("context", "proposed"),),
    "RunCompleted": (("output",),),
}

MARKER = b'{"$blobs":'
_KEY = "$blobs"
_REF = "sha256:"


@dataclass(frozen=True)
class BrokenBlob:
    """A reference whose value is missing from the store (`found` is None) or whose bytes no
    longer hash to the reference (`found` is what they hash to now)."""

    path: str
    expected: str
    found: str | None

    @property
    def message(self) -> str:
        what = f"its {self.path} (stored apart as sha256 {self.expected[:16]}…)"
        if self.found is None:
            return f"{what} is missing from the store"
        return f"{what} was changed: its bytes now hash to {self.found[:16]}…"


def offload(type_name: str, state: bytes, threshold: int) -> tuple[bytes, dict[str, bytes]]:
    """An event's stored form with its payloads over `threshold` bytes (canonical JSON) replaced
    by references, and those payloads by hash. Unchanged when none is that large."""
    paths = PAYLOADS.get(type_name)
    if not paths:
        return state, {}
    data = json.loads(state)
    if not isinstance(data, dict):
        return state, {}
    blobs: dict[str, bytes] = {}
    refs: list[list[str]] = []
    for pattern in paths:
        for path in _expand(data, pattern):
            value = _get(data, path)
            if value is None:
                continue
            raw = canonical_json(value)
            if len(raw) <= threshold:
                continue
            digest = hashlib.sha256(raw).hexdigest()
            blobs[digest] = raw
            data = _set(data, path, _REF + digest)
            refs.append(path)
    if not refs:
        return state, {}
    data[_KEY] = sorted(refs)
    return canonical_json(data), blobs


def references(state: bytes) -> list[str]:
    """The hashes a stored event refers to (none unless it starts with `MARKER`)."""
    if not state.startswith(MARKER):
        return []
    data = json.loads(state)
    return [_digest(_get(data, path)) for path in data[_KEY]]


def resolve(state: bytes, blobs: Mapping[str, bytes]) -> tuple[bytes, list[BrokenBlob]]:
    """The event's whole stored form, its references replaced by the values in `blobs`, and the
    references that could not be resolved faithfully. A changed value is put in as it is now
    (so the chain shows the change); a missing or unreadable one leaves its reference in place.
    Raises ValueError when the references themselves are malformed."""
    if not state.startswith(MARKER):
        return state, []
    data = json.loads(state)
    paths = data.pop(_KEY)
    if not isinstance(paths, list):
        raise ValueError("the list of payloads stored apart is malformed")
    broken: list[BrokenBlob] = []
    unresolved: list[list[str]] = []
    for path in paths:
        if not isinstance(path, list) or not all(isinstance(k, str) for k in path):
            raise ValueError(f"a payload stored apart has a malformed place: {path!r}")
        expected = _digest(_get(data, path))
        raw = blobs.get(expected)
        found = None if raw is None else hashlib.sha256(raw).hexdigest()
        if found != expected:
            broken.append(BrokenBlob(".".join(path), expected, found))
        try:
            value = json.loads(raw) if raw is not None else None
        except ValueError:
            raw = None
        if raw is None:
            unresolved.append(path)
        else:
            data = _set(data, path, value)
    if unresolved:
        data[_KEY] = unresolved  # still references: it must not pass for the whole event
    return canonical_json(data), broken


def _digest(ref: Any) -> str:
    if not isinstance(ref, str) or not ref.startswith(_REF):
        raise ValueError(f"a payload stored apart has a malformed reference: {ref!r}")
    return ref.removeprefix(_REF)


def _expand(data: dict[str, Any], pattern: tuple[str, ...]) -> Iterator[list[str]]:
    """The concrete paths a pattern names in `data` (each `*` for every key found there)."""
    if "*" not in pattern:
        yield list(pattern)
        return
    star = pattern.index("*")
    parent = _get(data, list(pattern[:star]))
    if isinstance(parent, dict):
        for key in sorted(parent):
            yield from _expand(data, (*pattern[:star], key, *pattern[star + 1 :]))


def _get(data: Any, path: list[str]) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _set(data: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """A copy of `data` with `value` at `path` (copying only the mappings along the path)."""
    head, *rest = path
    inner = data.get(head)
    return {**data, head: _set(inner, rest, value) if rest and isinstance(inner, dict) else value}
