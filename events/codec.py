"""Canonical encoding of events, version upcasting on read, and hashing."""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any

from pydantic import BaseModel

from cairn.events.base import Event, UnknownEventError, event_class


def topic_of(event: Event) -> str:
    """The stored topic: type name and version, e.g. `TaskCompleted@1`."""
    return f"{event.type_name()}@{event.version}"


def parse_topic(topic: str) -> tuple[str, int]:
    name, sep, version = topic.partition("@")
    if not sep or not version.isdigit():
        raise UnknownEventError(f"malformed event topic {topic!r}")
    return name, int(version)


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(data: Any) -> bytes:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8."""
    return _CANONICAL.encode(data).encode()


def encode_event(event: Event) -> bytes:
    """The stored bytes of an event (its run and position live in the store's own columns)."""
    return _encoded(event).stored


def event_json(event: Event) -> bytes:
    """The event's canonical JSON with its run and position: what its hash is taken over,
    and what live notices carry."""
    return _encoded(event).full


def _encoded(event: Event) -> _HashRef:
    """Encode an event once for all its uses: its stored bytes, its hashed bytes, its hash.

    The stored form leaves out `run_id` and `seq`; the hashed form has them at their sorted
    places. The members before, between and after those two keys are encoded apart and
    joined both ways, which gives exactly `canonical_json` of either dict."""
    ref = _hashes.get(id(event))
    if ref is not None and ref() is event and ref.stored:
        return ref
    data = event.model_dump(mode="json")
    run_id = data.pop("run_id")
    seq = data.pop("seq")
    head: dict[str, Any] = {}
    middle: dict[str, Any] = {}
    tail: dict[str, Any] = {}
    for key, value in data.items():
        (head if key < "run_id" else middle if key < "seq" else tail)[key] = value
    parts = [_members(head), _members(middle), _members(tail)]
    stored = b"{" + b",".join(p for p in parts if p) + b"}"
    parts.insert(1, b'"run_id":"%s"' % run_id.encode())
    parts.insert(3, b'"seq":%d' % seq)
    full = b"{" + b",".join(p for p in parts if p) + b"}"
    if ref is not None and ref() is event:
        ref.stored, ref.full = stored, full  # the hash was known (an upcast event's)
        return ref
    return _remember(event, _link(topic_of(event), full), upcast=False, stored=stored, full=full)


def _members(data: dict[str, Any]) -> bytes:
    return canonical_json(data)[1:-1] if data else b""


def decode_event(topic: str, state: bytes, run_id: Any, seq: int) -> Event:
    """Rebuild an event from the store, upcasting older versions to the current model."""
    name, version = parse_topic(topic)
    cls = event_class(name)
    if version == cls.version and state[:1] == b"{" and len(state) > 2:
        # The common case, about twice as fast: pydantic parses the stored bytes directly,
        # with the place in the store spliced in front of the stored fields.
        head = b'{"run_id":"%s","seq":%d,' % (str(run_id).encode(), seq)
        try:
            return cls.model_validate_json(head + state[1:])
        except ValueError:
            pass  # fall through to the general path, which names what is wrong
    data = json.loads(state)
    if not isinstance(data, dict):
        raise ValueError(f"stored {name} event {seq} of run {run_id} is not a JSON object")
    if version > cls.version:
        raise UnknownEventError(
            f"event {seq} of run {run_id} is {name} version {version}, newer than this code's "
            f"version {cls.version}: upgrade cairn to read it"
        )
    stored_hash = link_hash(topic, data, run_id, seq) if version < cls.version else None
    while version < cls.version:
        try:
            upcast = cls.upcasters[version]
        except KeyError:
            raise UnknownEventError(f"no upcaster for {name} from version {version}") from None
        data = upcast(data)
        version += 1
    data["run_id"] = run_id
    data["seq"] = seq
    event = cls.model_validate(data)
    if stored_hash is not None:
        _remember(event, stored_hash, upcast=True)
    return event


def event_hash(event: Event) -> str:
    """The link to this event in its run's hash chain: SHA-256 over its topic (type and
    version) and its canonical encoding, run id and position included: every stored field.

    For an event read from an older version it is the hash of what was written (the link the
    next event recorded), not of its upcast form: upgrading the code must not break chains.
    Computed once per event object (events are immutable; deciding and folding both ask)."""
    ref = _hashes.get(id(event))
    if ref is not None and ref() is event:
        return ref.digest
    return _encoded(event).digest


def link_hash(topic: str, data: dict[str, Any], run_id: Any, seq: int) -> str:
    """`event_hash` of a stored event, from its topic, its stored JSON object and its place in
    the store (equal to `event_hash` of the event as it was written, whatever version the code
    is now)."""
    return _link(topic, canonical_json({**data, "run_id": str(run_id), "seq": seq}))


def legacy_link_hash(data: dict[str, Any], run_id: Any, seq: int) -> str:
    """The link of a stored event as cairn wrote it before links covered the topic: SHA-256
    over the canonical JSON alone. Accepted only where a run's signed checkpoint says its
    links were written that way (see `cairn.runtime.eventlog.checkpoints`)."""
    return hashlib.sha256(canonical_json({**data, "run_id": str(run_id), "seq": seq})).hexdigest()


def _link(topic: str, full: bytes) -> str:
    # The topic first and apart from the JSON (which cannot hold a newline outside a string),
    # so that flipping an event's type or version breaks the link as an edit would.
    return hashlib.sha256(topic.encode() + b"\n" + full).hexdigest()


def was_upcast(event: Event) -> bool:
    """Whether the event was read from an older version than its class's current one."""
    ref = _hashes.get(id(event))
    return ref is not None and ref() is event and ref.upcast


class _HashRef(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to an event that carries its hash; it leaves the cache with the event.
    (Not a private attribute on the model: that would take part in `==` and in `model_copy`.)"""

    __slots__ = ("digest", "full", "key", "stored", "upcast")
    digest: str
    key: int
    upcast: bool
    stored: bytes  # empty until encoded
    full: bytes


_hashes: dict[int, _HashRef] = {}


def _forget(ref: _HashRef) -> None:
    if _hashes.get(ref.key) is ref:
        del _hashes[ref.key]


def _remember(
    event: Event, digest: str, *, upcast: bool, stored: bytes = b"", full: bytes = b""
) -> _HashRef:
    ref = _HashRef(event, _forget)
    ref.digest, ref.key, ref.upcast, ref.stored, ref.full = digest, id(event), upcast, stored, full
    _hashes[ref.key] = ref
    return ref


def content_hash(value: Any) -> str:
    """SHA-256 over the canonical JSON of a value (outputs, models)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return hashlib.sha256(canonical_json(value)).hexdigest()
