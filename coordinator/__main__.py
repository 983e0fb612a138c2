"""`python -m cairn.coordinator`: run the coordinator service until SIGTERM or Ctrl-C.

At start it waits for NATS and for a PostgreSQL store's server (`runtime/waiting.py`, up to
CAIRN_START_TIMEOUT), then declares cairn's streams and opens the store; what cannot work is
one line on stderr and exit status 2.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import ServiceUnavailableError

from cairn.coordinator.service import create_app
from cairn.coordinator.tenants import TenantLimitsError, load_tenant_limits
from cairn.runtime import crashpoints, tracing
from cairn.runtime.connection import NatsUnavailableError, display_url
from cairn.runtime.eventlog.store import EventStore, StoreUnavailableError
from cairn.runtime.roles import ROLE_COORDINATOR
from cairn.runtime.settings import Settings, SettingsError
from cairn.runtime.streams import StreamMismatchError, declare_streams
from cairn.runtime.waiting import Patience, connect_when_up, open_when_up


def _say(line: str) -> None:
    print(f"cairn coordinator: {line}", file=sys.stderr, flush=True)


async def _declare(settings: Settings) -> None:
    """Wait for NATS, then make or check cairn's streams (the coordinator owns them)."""
    nc = await connect_when_up(
        lambda: settings.nats_endpoint(ROLE_COORDINATOR),
        "cairn-preflight",
        settings.start_timeout,
        _say,
        reconnect=False,
    )
    patience = Patience(settings.start_timeout)
    try:
        while True:
            try:
                await declare_streams(nc.jetstream())
                return
            except (ServiceUnavailableError, NoRespondersError, NatsTimeoutError):
                # A server that has only just opened its port may not serve JetStream yet.
                where = display_url(nc.connected_url.geturl() if nc.connected_url else None)
                if patience.expired():
                    raise NatsUnavailableError(
                        f"NATS at {where} does not answer JetStream requests: start nats-server "
                        "with JetStream enabled (-js), or use `cairn up`"
                    ) from None
                if line := patience.line(f"JetStream at {where}: it does not answer yet"):
                    _say(line)
                await asyncio.sleep(patience.next_pause())
    finally:
        await nc.close()


def _preflight(settings: Settings) -> None:
    """Fail with one clear sentence when NATS or the store cannot be reached in time."""
    asyncio.run(_declare(settings))
    store = open_when_up(
        lambda: EventStore.from_settings(settings),
        [settings.store],
        settings.start_timeout,
        _say,
    )
    store.close()
    load_tenant_limits(settings.tenants)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        settings = Settings.from_env()
        crashpoints.arm(settings.crash_at)
        _preflight(settings)
        tracing.setup("cairn-coordinator")
    except (
        SettingsError,
        NatsUnavailableError,
        StoreUnavailableError,
        TenantLimitsError,
        StreamMismatchError,
        tracing.TracingConfigError,
    ) as exc:
        print(f"cairn coordinator: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        asyncio.run(create_app(settings).run())
    finally:
        tracing.shutdown()  # what is still buffered goes out before the process ends


if __name__ == "__main__":
    main()
