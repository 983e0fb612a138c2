"""Base classes for stored events and wire messages, and the registry of event versions."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

# Stable namespace for deterministic ids: an event's id is derived from its run and position,
# so re-deciding a history (replay) or re-publishing after a crash yields the same ids.
CAIRN_NAMESPACE = uuid.UUID("5b0f4a52-2b8c-4c55-9a43-6f0c7d1e9a10")


def _is_none(value: object) -> bool:
    return value is None


def unset_none() -> Any:
    """An optional field that is left out of the encoding while it is None, so adding it to an
    event changes neither the stored bytes nor the hash of events that do not carry it."""
    return Field(default=None, exclude_if=_is_none)


class Frozen(BaseModel):
    """An immutable model that rejects unknown fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Event(Frozen):
    """A fact recorded in a run's stream.

    Every event records its place (`run_id`, `seq`), when it was decided (`at`, taken from the
    fact that caused it, never from a clock inside the decision), who decided (`actor`) and why
    (`reason`).
    """

    version: ClassVar[int] = 1
    # Upcasters from older versions: {1: fn(v1 dict) -> v2 dict, ...}
    upcasters: ClassVar[dict[int, Callable[[dict[str, Any]], dict[str, Any]]]] = {}

    run_id: uuid.UUID
    seq: int
    at: datetime
    actor: str
    reason: str = ""
    # SHA-256 of the run's previous event (its canonical encoding); "" for the first. Chains
    # each run's stream so an edit, deletion or reordering in the store shows.
    prev_hash: str = ""
    # The run's OpenTelemetry trace (32 hex digits) when it was started with tracing on: the
    # way from an audit row to the trace. Taken from the run's state, never from a clock.
    trace_id: str | None = unset_none()

    @property
    def event_id(self) -> uuid.UUID:
        return event_id(self.run_id, self.seq)

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__


def event_id(run_id: uuid.UUID, seq: int) -> uuid.UUID:
    """The id of the event at position `seq` of run `run_id`."""
    return uuid.uuid5(CAIRN_NAMESPACE, f"{run_id}/{seq}")


class UnknownEventError(ValueError):
    """A stored event names a type or version this code does not know."""


_REGISTRY: dict[str, type[Event]] = {}


def register(cls: type[Event]) -> type[Event]:
    """Make an event class known to the codec (used as a class decorator)."""
    name = cls.type_name()
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"event type {name} is registered twice")
    _REGISTRY[name] = cls
    return cls


def event_class(name: str) -> type[Event]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownEventError(f"unknown event type {name!r}") from None


def event_types() -> dict[str, type[Event]]:
    return dict(_REGISTRY)
