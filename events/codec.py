"""Canonical encoding of events, version upcasting on read, and hashing."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

from .base import Event, UnknownEventError, event_class


def topic_of(event: Event) -> str:
    """The stored topic: type name and version, e.g. `TaskCompleted@1`."""
    return f"{event.type_name()}@{event.version}"


def parse_topic(topic: str) -> tuple[str, int]:
    name, sep, version = topic.partition("@")
    if not sep or not version.isdigit():
        raise UnknownEventError(f"malformed event topic {topic!r}")
    return name, int(version)


def canonical_json(data: Any) -> bytes:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def encode_event(event: Event) -> bytes:
    """The stored bytes of an event (its run and position live in the store's own columns)."""
    return canonical_json(event.model_dump(mode="json", exclude={"run_id", "seq"}))


def decode_event(topic: str, state: bytes, run_id: Any, seq: int) -> Event:
    """Rebuild an event from the store, upcasting older versions to the current model."""
    name, version = parse_topic(topic)
    cls = event_class(name)
    data: dict[str, Any] = json.loads(state)
    if version > cls.version:
        raise UnknownEventError(
            f"event {name} has version {version}, newer than this code's {cls.version}; "
            "upgrade cairn to read it"
        )
    while version < cls.version:
        try:
            upcast = cls.upcasters[version]
        except KeyError:
            raise UnknownEventError(f"no upcaster for {name} from version {version}") from None
        data = upcast(data)
        version += 1
    data["run_id"] = run_id
    data["seq"] = seq
    return cls.model_validate(data)


def event_hash(event: Event) -> str:
    """The link to this event in its run's hash chain: SHA-256 over its canonical encoding,
    run id and position included."""
    return hashlib.sha256(canonical_json(event.model_dump(mode="json"))).hexdigest()


def content_hash(value: Any) -> str:
    """SHA-256 over the canonical JSON of a value (outputs, models)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return hashlib.sha256(canonical_json(value)).hexdigest()
