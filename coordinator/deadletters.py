"""Dead letters: messages cairn could not process, kept on `cairn.dlq.<source>` with the reason."""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime

from nats.js import JetStreamContext
from pydantic import ValidationError

from cairn.events import DeadLetter, dlq_subject

log = logging.getLogger("cairn.dlq")


def validation_reason(exc: ValidationError, what: str) -> str:
    """One sentence out of a pydantic error: what was wrong and where."""
    errors = exc.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"{what} is not valid JSON: {first['msg']}"
    if first["type"] == "literal_error" and first["loc"] == ("v",):
        return f"{what} has an unsupported protocol version (this coordinator speaks v1)"
    where = ".".join(str(p) for p in first["loc"]) or "(root)"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{what} has the wrong shape: {where}: {first['msg']}{more}"


class DeadLetters:
    """Publish dead letters and count them by reason kind."""

    def __init__(self, js: JetStreamContext, service: str) -> None:
        self._js = js
        self._service = service
        self.counts: Counter[str] = Counter()

    async def send(self, source: str, subject: str, payload: bytes, reason: str) -> None:
        self.counts[source] += 1
        letter = DeadLetter(
            subject=subject,
            reason=reason,
            payload=payload[:65536].decode("utf-8", errors="replace"),
            received_at=datetime.now(UTC),
            service=self._service,
        )
        log.warning("dead letter from %s: %s", subject, reason)
        try:
            await self._js.publish(dlq_subject(source), letter.model_dump_json().encode())
        except Exception as exc:  # the DLQ must never take the process down
            log.error("could not publish a dead letter (%s): %s", reason, exc)
