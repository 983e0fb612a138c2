"""Dead letters: messages cairn could not process, kept on `cairn.dlq.<source>` with the reason."""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime

from nats.aio.msg import Msg
from nats.errors import NotJSMessageError
from nats.js import JetStreamContext
from pydantic import BaseModel

from cairn.events import DeadLetter, dlq_subject

log = logging.getLogger("cairn.dlq")

# A dead letter keeps the start of a bad payload: enough to diagnose, never too big to store.
DEAD_LETTER_EXCERPT = 64 * 1024


# What a number that parses to NaN or ±Infinity must contain in the raw JSON: the words, an
# exponent, or more digits than a finite float has. Most messages have none: no walk needed.
_MAYBE_NON_FINITE = re.compile(rb"NaN|Infinity|\d[eE]|\d{308}")


def non_finite_reason(message: BaseModel, what: str, raw: bytes | None = None) -> str | None:
    """The dead-letter reason for a message holding NaN or ±Infinity, or None when it holds none.
    With the `raw` JSON it was parsed from, most messages are cleared without a walk."""
    if raw is not None and _MAYBE_NON_FINITE.search(raw) is None:
        return None
    where = non_finite_number(message)
    if where is None:
        return None
    return (
        f"{what} is not valid JSON: {where} is NaN, Infinity or out of range "
        "(JSON numbers must be finite)"
    )


def non_finite_number(message: BaseModel) -> str | None:
    """Where a validated message holds NaN or ±Infinity (`(root)` or a dotted path), if anywhere.

    pydantic's JSON parser accepts `NaN`, `Infinity` and overflowing numbers such as `1e999`.
    They are not JSON: stored, they come back as null or as a value that no longer validates.
    """
    return _non_finite(message.model_dump(), ())


def _non_finite(value: object, path: tuple[object, ...]) -> str | None:
    if isinstance(value, float):
        return None if math.isfinite(value) else ".".join(map(str, path)) or "(root)"
    items: Iterable[tuple[object, object]]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _non_finite(item, (*path, key))
        if found is not None:
            return found
    return None


class DeadLetters:
    """Publish dead letters on `cairn.dlq.<source>` and count them by source.

    A letter keeps the first 64 KiB of the payload: enough to diagnose, never too big to store.
    A message that can come again (a JetStream delivery) is named by its stream and sequence
    (`Nats-Msg-Id`), so however often it is redelivered and dead-lettered, the DLQ holds it once.
    Publishing never raises: `send` says whether JetStream stored the letter, and the caller
    decides what an unrecorded bad message means (the agents leave it for redelivery).
    """

    def __init__(self, js: JetStreamContext, service: str) -> None:
        self._js = js
        self._service = service
        self.counts: Counter[str] = Counter()

    def total(self) -> int:
        """Dead letters sent by this process so far."""
        return sum(self.counts.values())

    async def send(
        self, source: str, subject: str, payload: bytes, reason: str, *, msg_id: str | None = None
    ) -> bool:
        """Dead-letter `payload`, received on `subject`; True once JetStream has stored it."""
        self.counts[source] += 1
        letter = DeadLetter(
            subject=subject,
            reason=reason,
            payload=payload[:DEAD_LETTER_EXCERPT].decode("utf-8", errors="replace"),
            received_at=datetime.now(UTC),
            service=self._service,
        )
        log.warning("dead letter from %s: %s", subject, reason)
        headers = {"Nats-Msg-Id": msg_id} if msg_id is not None else None
        try:
            await self._js.publish(
                dlq_subject(source), letter.model_dump_json().encode(), headers=headers
            )
        except Exception as exc:  # the DLQ must never take the process down
            log.error("could not publish a dead letter (%s): %s", reason, exc)
            return False
        return True

    async def send_message(self, source: str, msg: Msg, reason: str) -> bool:
        """Dead-letter a received message; one from JetStream is kept once (see the class)."""
        return await self.send(source, msg.subject, msg.data, reason, msg_id=delivery_id(msg))


def delivery_id(msg: Msg) -> str | None:
    """`<stream>:<sequence>` of a JetStream message, the same on every redelivery; None for a
    plain NATS message (a request), which is never delivered twice."""
    try:
        metadata = msg.metadata
    except NotJSMessageError:
        return None
    return f"{metadata.stream}:{metadata.sequence.stream}"
