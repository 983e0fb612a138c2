"""Dead letters: messages cairn could not process, kept on `cairn.dlq.<source>` with the reason,
and read back (`read_dead_letters`) for `cairn dead-letters` and `GET /api/dead-letters`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NotJSMessageError
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError
from pydantic import BaseModel, ValidationError

from cairn.events import DLQ_STREAM, DeadLetter, dlq_subject, result_run

log = logging.getLogger("cairn.dlq")

# A dead letter keeps the start of a bad payload: enough to diagnose, never too big to store.
DEAD_LETTER_EXCERPT = 64 * 1024


# What a number that parses to NaN or ±Infinity must contain in the raw JSON: the words, an
# exponent, or more digits than a finite float has. A JSON number stands where a value does,
# after `:`, `[` or `,`, so digits and an `e` inside a string (every uuid has some) do not
# count. Most messages have none: no walk needed.
_MAYBE_NON_FINITE = re.compile(rb"NaN|Infinity|(?:^|[:\[,])\s*-?\d+(?:\.\d*)?[eE]|\d{308}")


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
        log.warning("dead letter from %s: %r", subject, reason)  # %r: one line, however written
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


# -- reading them back ---------------------------------------------------------------------------

# Letters fetched from the stream at once while reading it back (each is one request).
_READ_CONCURRENCY = 64
_DLQ_PREFIX = dlq_subject("")


class DeadLettersUnavailableError(RuntimeError):
    """CAIRN_DLQ could not be read (NATS gone, or a role not allowed to read it); says which."""


@dataclass(frozen=True)
class StoredLetter:
    """One dead letter as `CAIRN_DLQ` holds it.

    `source` comes from the subject it was published on, which NATS permissions tie to a role
    (`coordinator` and `coordinator.<capability>` for the coordinator's, `agent.<capability>`
    for that capability's user only). Everything in `letter` is what the publisher said, and a
    letter that does not parse is kept as `unreadable` with its raw text, never dropped.
    """

    seq: int
    source: str
    stored_at: datetime
    run_id: uuid.UUID | None
    letter: DeadLetter | None
    unreadable: str | None = None

    def summary(self) -> dict[str, Any]:
        """Plain data for `--json` and the HTTP API."""
        letter = self.letter
        return {
            "seq": self.seq,
            "source": self.source,
            "stored_at": self.stored_at.isoformat(),
            "run_id": str(self.run_id) if self.run_id else None,
            "subject": letter.subject if letter else None,
            "reason": letter.reason if letter else f"unreadable dead letter: {self.unreadable}",
            "service": letter.service if letter else None,
            "received_at": letter.received_at.isoformat() if letter else None,
            "payload": letter.payload if letter else None,
        }


# The filters' shapes, for every reader (CLI, API) to check alike: a source is the rest of a
# `cairn.dlq.<source>` subject (tokens, no wildcards); a run is an id or its first characters.
SOURCE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
RUN_PREFIX = re.compile(r"[0-9a-fA-F-]{1,36}")


@dataclass(frozen=True)
class ReasonCount:
    """How many letters one source refused for one reason (ids and numbers masked)."""

    source: str
    reason: str
    letters: int


@dataclass(frozen=True)
class DeadLetterReport:
    """What `CAIRN_DLQ` holds: counts by source (exact, from the stream) and the newest letters
    that match the filters, newest first. With a filter every letter it may match is read, so
    `matched` and `by_reason` cover them all; without one only the newest `limit` are read, and
    `by_reason` covers those (`read` says how many)."""

    total: int
    by_source: dict[str, int]
    letters: list[StoredLetter]
    matched: int
    read: int
    by_reason: list[ReasonCount] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Plain data for `--json` and the HTTP API."""
        return {
            "total": self.total,
            "by_source": self.by_source,
            "matched": self.matched,
            "read": self.read,
            "by_reason": [
                {"source": r.source, "reason": r.reason, "letters": r.letters}
                for r in self.by_reason
            ],
            "letters": [letter.summary() for letter in self.letters],
        }


def run_of(subject: str, payload: str) -> uuid.UUID | None:
    """The run a dead letter concerns: from a result's subject, else from a `run_id` the
    payload names (a command, a task envelope); None when neither says."""
    if (of_subject := result_run(subject)) is not None:
        return of_subject
    if not payload.startswith("{"):
        return None
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):  # anyone's text: deep nesting must not stop the read
        return None
    value = data.get("run_id") if isinstance(data, dict) else None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return uuid.UUID(value)
    return None


def reason_kind(reason: str) -> str:
    """A reason with its ids and numbers masked, so letters refused for the same rule count
    together (`task <id> was never dispatched in run <id>`)."""
    return _NUMBERS.sub("<n>", _UUIDS.sub("<id>", reason))[:200]


_UUIDS = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_NUMBERS = re.compile(r"(?<![\w<])\d+(?:[.,]\d+)*(?:[eE][+-]?\d+)?")


async def read_dead_letters(
    js: JetStreamContext,
    *,
    run: str | None = None,
    source: str | None = None,
    limit: int = 20,
) -> DeadLetterReport:
    """The dead letters `CAIRN_DLQ` holds (seven days of them), newest first.

    `run` keeps letters whose run id starts with it (a full id or a prefix; read from every
    letter, so it reads the whole stream, at most `DEAD_LETTERS_PER_SOURCE` a source), `source`
    those published by one source (`coordinator`, `coordinator.writer`, `agent.writer`).
    Nothing is consumed or changed.
    """
    if source is not None and not SOURCE.fullmatch(source):
        raise ValueError(
            f"{source!r} is not a dead-letter source: e.g. coordinator, coordinator.writer, "
            "agent.writer (letters, digits, '-', '_' and dots)"
        )
    try:
        return await _read(js, run, source, limit)
    except NatsError as exc:
        raise DeadLettersUnavailableError(
            f"could not read the dead letters in {DLQ_STREAM} ({type(exc).__name__}: {exc}); "
            "reading them needs the admin or observer role and a running NATS"
        ) from None


async def _read(
    js: JetStreamContext, run: str | None, source: str | None, limit: int
) -> DeadLetterReport:
    try:
        info = await js.stream_info(DLQ_STREAM, subjects_filter=f"{_DLQ_PREFIX}>")
    except NotFoundError:  # no coordinator has declared the streams yet: nothing dead-lettered
        info = None
    if info is None or not info.state.messages:
        return DeadLetterReport(total=0, by_source={}, letters=[], matched=0, read=0)
    by_source: Counter[str] = Counter()
    for subject, count in (info.state.subjects or {}).items():
        by_source[subject.removeprefix(_DLQ_PREFIX)] += count
    total = info.state.messages
    first, last = max(info.state.first_seq, 1), info.state.last_seq
    needle = run.lower() if run else None
    if needle is None and source is None:
        found = _newest(js, first, last, limit)
    else:  # every letter of the source (or of all), oldest first, skipping what was removed
        found = _every(js, f"{_DLQ_PREFIX}{source if source is not None else '>'}", first, last)
    newest: deque[StoredLetter] = deque(maxlen=limit)
    kinds: Counter[tuple[str, str]] = Counter()
    matched = read = 0
    async for stored in found:
        read += 1
        if needle is not None and not str(stored.run_id or "").startswith(needle):
            continue
        matched += 1
        kinds[stored.source, reason_kind(stored.summary()["reason"])] += 1
        newest.append(stored)
    if needle is None:
        matched = by_source.get(source, 0) if source is not None else total
    return DeadLetterReport(
        total=total, by_source=dict(by_source), matched=matched, read=read,
        letters=sorted(newest, key=lambda s: s.seq, reverse=True),
        by_reason=[ReasonCount(s, r, n) for (s, r), n in kinds.most_common()],
    )  # fmt: skip


async def _newest(
    js: JetStreamContext, first: int, last: int, limit: int
) -> AsyncIterator[StoredLetter]:
    """The newest `limit` letters of any source, newest first, read `_READ_CONCURRENCY` at a
    time from the end (where letters stand close together)."""
    seq, given = last, 0
    while seq >= first and given < limit:
        batch = range(seq, max(first, seq - _READ_CONCURRENCY + 1) - 1, -1)
        seq = batch[-1] - 1
        for stored in await asyncio.gather(*(_letter_at(js, s) for s in batch)):
            if stored is not None and given < limit:  # None: removed since the count
                given += 1
                yield stored


async def _every(
    js: JetStreamContext, subjects: str, first: int, last: int
) -> AsyncIterator[StoredLetter]:
    """Every letter on `subjects` up to `last` (the counts' snapshot), oldest first. Each read
    asks for the next letter at or after a sequence, so gaps left by removed letters (a flood's
    evicted ones) cost nothing: the reads are bounded by the letters kept, never by the
    sequences used."""
    seq = first
    while seq <= last:
        try:
            raw = await js.get_msg(DLQ_STREAM, seq, subject=subjects, next=True)
        except NotFoundError:
            return
        if raw.seq is None or raw.seq > last:
            return
        yield _stored(raw)
        seq = raw.seq + 1


async def _letter_at(js: JetStreamContext, seq: int) -> StoredLetter | None:
    try:
        return _stored(await js.get_msg(DLQ_STREAM, seq))
    except NotFoundError:
        return None


def _stored(raw: RawStreamMsg) -> StoredLetter:
    """A letter as the stream returned it; one that is not a `DeadLetter` is kept as unreadable."""
    seq = raw.seq or 0
    subject = raw.subject or ""
    stored_at = _stored_at(raw.time)
    data = raw.data or b""
    try:
        letter = DeadLetter.model_validate_json(data)
    except ValidationError as exc:
        text = data[:200].decode("utf-8", errors="replace")
        return StoredLetter(
            seq=seq, source=subject.removeprefix(_DLQ_PREFIX), stored_at=stored_at,
            run_id=None, letter=None, unreadable=f"{exc.error_count()} error(s) in {text!r}",
        )  # fmt: skip
    return StoredLetter(
        seq=seq, source=subject.removeprefix(_DLQ_PREFIX), stored_at=stored_at,
        run_id=run_of(letter.subject, letter.payload), letter=letter,
    )  # fmt: skip


def _stored_at(value: datetime | None) -> datetime:
    if value is None:
        return datetime.fromtimestamp(0, UTC)
    return value if value.tzinfo else value.replace(tzinfo=UTC)
