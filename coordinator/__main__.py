"""`python -m cairn.coordinator`: run the coordinator service until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import sys

from cairn.coordinator.service import create_app
from cairn.coordinator.tenants import TenantLimitsError, load_tenant_limits
from cairn.runtime import crashpoints, tracing
from cairn.runtime.connection import NatsUnavailableError, connect
from cairn.runtime.eventlog.store import EventStore, StoreUnavailableError
from cairn.runtime.roles import ROLE_COORDINATOR
from cairn.runtime.settings import Settings, SettingsError
from cairn.runtime.streams import StreamMismatchError, declare_streams


async def _preflight(settings: Settings) -> None:
    """Fail with one clear sentence when NATS or the store cannot be reached."""
    endpoint = settings.nats_endpoint(ROLE_COORDINATOR)
    nc = await connect(endpoint, "cairn-preflight", reconnect=False)
    try:
        await declare_streams(nc.jetstream())  # the coordinator owns them: made or checked here
    finally:
        await nc.close()
    EventStore.from_settings(settings).close()
    load_tenant_limits(settings.tenants)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        settings = Settings.from_env()
        crashpoints.arm(settings.crash_at)
        asyncio.run(_preflight(settings))
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
