"""A standing pull request on a durable JetStream consumer.

nats-py's `fetch(n)` waits for n messages or its timeout, which adds that timeout to a lone
message on a quiet stream. Instead this keeps one large pull request outstanding, so messages
flow in as they arrive, and hands the consumer of this class whatever has arrived so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger("cairn.pull")


class StandingPull:
    """Keep a pull request of `batch` messages open on `stream`/`consumer`; re-issue it as it
    fills or expires, and again whenever the connection comes back."""

    def __init__(
        self, nc: Client, stream: str, consumer: str, *, batch: int = 1000, expires: float = 5.0
    ) -> None:
        self._nc = nc
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._batch = batch
        self._expires = expires
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._remaining = 0
        self._deadline = 0.0
        self._inbox = ""
        self._sub: Subscription | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._reconnects = 0

    async def start(self) -> None:
        self._reconnects = self._nc.stats["reconnects"]
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_message)
        await self._request()
        self._watchdog = asyncio.create_task(self._watch(), name="standing-pull-watchdog")

    async def stop(self) -> None:
        if self._watchdog:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def next_batch(self, limit: int = 1000) -> list[Msg]:
        """Wait for at least one message, then return all that have arrived (up to `limit`)."""
        first = await self._queue.get()
        batch = [first]
        while len(batch) < limit:
            try:
                batch.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        return batch

    def reset(self) -> None:
        """Forget the outstanding request (the server lost it, e.g. after a reconnect)."""
        self._remaining = 0
        self._deadline = 0.0

    async def _request(self) -> None:
        if not self._nc.is_connected:
            self.reset()
            return
        request = {"batch": self._batch, "expires": int(self._expires * 1e9)}
        self._remaining = self._batch
        # A little slack past the server's expiry before we assume the request is gone.
        self._deadline = time.monotonic() + self._expires + 1.0
        try:
            await self._nc.publish(self._subject, json.dumps(request).encode(), reply=self._inbox)
        except Exception as exc:  # disconnected: the watchdog asks again
            log.debug("pull request failed: %s", exc)
            self.reset()

    async def _on_message(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            self._queue.put_nowait(msg)
            self._remaining -= 1
            if self._remaining <= 0:
                await self._request()
            return
        if status == "100":  # idle heartbeat / flow control
            return
        # 404 no messages, 408 request expired, 409 consumer changed or limits: ask again.
        if status not in ("404", "408"):
            log.info("pull request ended: %s %s", status, (msg.headers or {}).get("Description"))
        await self._request()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            reconnects = self._nc.stats["reconnects"]
            if reconnects != self._reconnects and self._nc.is_connected:
                # A server that restarted has forgotten the request (and one that did not
                # dropped it with the old connection): ask again now, not at its expiry.
                self._reconnects = reconnects
                await self._request()
            elif time.monotonic() > self._deadline:
                await self._request()
