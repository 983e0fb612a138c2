"""`python -m cairn.projections [rebuild]`: keep the views up to date, or rebuild them.

Settings come from the environment (CAIRN_HOME, CAIRN_STORE, CAIRN_VIEWS, see `Settings`). The
runner needs no NATS: it reads the store. At start it waits for a PostgreSQL server of the store
or the views that does not accept connections yet, up to CAIRN_START_TIMEOUT (one line says
so). It stops cleanly, with exit status 0, on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
import time
from collections.abc import Sequence

from cairn.events import UnknownEventError
from cairn.projections.errors import ViewsUnavailableError
from cairn.projections.runner import ProjectionRunner, rebuild
from cairn.projections.storage import redacted
from cairn.runtime import crashpoints
from cairn.runtime.eventlog.store import StoreUnavailableError
from cairn.runtime.settings import Settings, SettingsError
from cairn.runtime.waiting import open_when_up

log = logging.getLogger("cairn.projections")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the projection runner until signalled (or rebuild the views); return the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m cairn.projections",
        description="Follow cairn's event log into the views (runs, steps, costs, audit).",
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=("run", "rebuild"),
        default="run",
        help="run: follow the log until stopped (default); rebuild: drop the views and replay",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        log.error("%s", exc)
        return 2
    crashpoints.arm(settings.crash_at)
    # What is alive now lives as long as the process: keep it out of the cyclic collector's
    # full passes, which otherwise walk it again and again while batches come and go (about
    # a tenth of a rebuild's time).
    gc.collect()
    gc.freeze()
    try:
        if args.command == "rebuild":
            started = time.perf_counter()
            count = rebuild(settings)
            seconds = time.perf_counter() - started
            log.info(
                "rebuilt the views at %s from %d events in %.2f s",
                redacted(settings.views),
                count,
                seconds,
            )
            return 0
        # Waited for before the signal handlers exist: SIGTERM still ends a waiting runner.
        runner = open_when_up(
            lambda: ProjectionRunner(settings),
            [settings.store, settings.views],
            settings.start_timeout,
            log.warning,
        )
        with runner:
            asyncio.run(_follow(settings, runner))
    except (StoreUnavailableError, ViewsUnavailableError) as exc:
        log.error("%s", exc)
        return 2
    except UnknownEventError as exc:
        # The log holds an event this version cannot read: stop rather than skip it, or the
        # views would silently miss a fact.
        log.error("cannot project the event log: %s", exc)
        return 3
    return 0


async def _follow(settings: Settings, runner: ProjectionRunner) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "projecting %s into %s from log position %d",
        redacted(settings.store),
        redacted(settings.views),
        runner.position(),
    )
    await runner.run(stop)
    log.info("stopped")


if __name__ == "__main__":
    sys.exit(main())
