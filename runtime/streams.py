"""cairn's JetStream streams: declared by the coordinator, which owns them, and waited for by
every other process.

No other role may create, change or delete them (see `roles.py`): a stream someone else made
first, with other settings (memory storage, a few messages kept, foreign subjects), would decide
what cairn's record survives. So the coordinator checks an existing stream against cairn's
declaration: what can be set back in place (subjects, limits, the duplicate window) is set back
and logged; what cannot (storage, retention, a mirror, a seal) is refused with one sentence that
names the difference and the fix.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from cairn.events import stream_configs

log = logging.getLogger("cairn.nats")


class StreamMismatchError(RuntimeError):
    """A stream of cairn's exists with settings that cannot be set back in place."""


# Settings a stream keeps for life, or that cairn's streams must not have at all: a stream
# holding them was not made by cairn's coordinator.
_FIXED = ("storage", "retention", "mirror", "sources", "sealed", "deny_delete", "deny_purge")
# Settings set back to cairn's declaration when they differ.
_REPAIRABLE = (
    "subjects",
    "max_msgs",
    "max_bytes",
    "max_age",
    "max_msg_size",
    "max_msgs_per_subject",
    "discard",
    "duplicate_window",
    "republish",
    "subject_transform",
)


def declared() -> list[StreamConfig]:
    """cairn's streams as the coordinator declares them."""
    configs = []
    for spec in stream_configs():
        params: dict[str, Any] = dict(spec)
        params["retention"] = RetentionPolicy(params["retention"])
        configs.append(StreamConfig(storage=StorageType.FILE, **params))
    return configs


def _expected(config: StreamConfig, field: str) -> Any:
    """What cairn's declaration means for a setting, as the server reports it."""
    value = getattr(config, field)
    if value is not None:
        return sorted(value) if field == "subjects" else value
    return {
        "max_msgs": -1,
        "max_bytes": -1,
        "max_age": 0.0,
        "max_msg_size": -1,
        "max_msgs_per_subject": -1,
        "discard": "old",
        "sealed": False,
        "deny_delete": False,
        "deny_purge": False,
    }.get(field)


def _actual(config: StreamConfig, field: str) -> Any:
    value = getattr(config, field)
    if field == "subjects" and value is not None:
        return sorted(value)
    if field in ("sealed", "deny_delete", "deny_purge"):
        return bool(value)
    if field in ("mirror", "sources", "republish", "subject_transform") and not value:
        return None
    if hasattr(value, "value"):  # an enum: compare its name as the server sends it
        return value.value
    return value


def differences(want: StreamConfig, have: StreamConfig, fields: Iterable[str]) -> list[str]:
    """`field X where cairn declares Y` for each setting that differs."""
    found = []
    for field in fields:
        expected, actual = _expected(want, field), _actual(have, field)
        if hasattr(expected, "value"):
            expected = expected.value
        if expected != actual:
            found.append(f"{field} {actual!r} where cairn declares {expected!r}")
    return found


async def declare_streams(js: JetStreamContext) -> None:
    """Create cairn's streams, or set an existing one back to cairn's declaration; raise
    StreamMismatchError for one that cannot be (made by someone else, with settings a stream
    keeps for life)."""
    for want in declared():
        assert want.name is not None
        try:
            info = await js.stream_info(want.name)
        except NotFoundError:
            await js.add_stream(want)
            continue
        have = info.config
        fixed = differences(want, have, _FIXED)
        if fixed:
            raise StreamMismatchError(
                f"the stream {want.name} exists with {'; '.join(fixed)}, which cannot be changed "
                "in place: it was not made by cairn's coordinator. Remove it (`nats stream rm "
                f"{want.name}`; its messages go with it) and start the coordinator again"
            )
        repair = differences(want, have, _REPAIRABLE)
        if repair:
            log.warning(
                "stream %s set back to cairn's declaration: %s", want.name, "; ".join(repair)
            )
            await js.update_stream(want)


async def wait_for_streams(
    js: JetStreamContext,
    *,
    on_wait: Callable[[list[str]], None] | None = None,
    interval: float = 1.0,
    timeout: float | None = None,
) -> None:
    """Wait until cairn's streams exist (the coordinator creates them); `on_wait(missing)` is
    called when waiting begins and every 30 s after. TimeoutError after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    told = -30.0
    while True:
        missing = []
        for spec in stream_configs():
            try:
                await js.stream_info(spec["name"])
            except NotFoundError:
                missing.append(spec["name"])
        if not missing:
            return
        now = loop.time() - started
        if timeout is not None and now >= timeout:
            raise TimeoutError(
                f"cairn's streams {', '.join(missing)} do not exist after {timeout:g} s: start "
                "the coordinator (it creates them)"
            )
        if on_wait is not None and now - told >= 30:
            on_wait(missing)
            told = now
        await asyncio.sleep(interval)
