"""`cairn demo` and `cairn up`: the whole system on one machine, each service its own process."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError
from rich.console import Console
from rich.live import Live

from cairn.events import Intent, WorkflowSpec

from .client import CairnClient
from .processes import Supervisor
from .progress import RunProgress
from .settings import Settings

DEMO_WORKFLOW = "research-report"
DEMO_TOPIC = "ocean tides"


class DemoError(RuntimeError):
    """A service of the demo did not come up or the run did not finish; says which."""


@dataclass
class DemoResult:
    run_id: uuid.UUID
    progress: RunProgress
    seconds: float


def demo_intent(topic: str) -> Intent:
    return Intent(
        goal=f"Explain {topic} to curious readers in a short, reviewed report",
        constraints=["stay under 600 words", "cite no invented sources"],
        success_criteria=["every planned question is answered", "the reviewer approves"],
    )


async def wait_for_services(sup: Supervisor, client: CairnClient, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        dead = sup.exited()
        if dead:
            name, code = next(iter(dead.items()))
            raise DemoError(
                f"the {name} process exited with code {code} at start:\n{sup.log_tail(name)}"
            )
        try:
            await client.ping(timeout=0.5)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the coordinator did not answer within {timeout:.0f}s; "
                    f"see {sup.settings.home / 'logs' / 'coordinator.log'}"
                ) from None
            await asyncio.sleep(0.05)


async def run_and_follow(
    client: CairnClient,
    workflow: str | WorkflowSpec,
    input: dict[str, Any],
    intent: Intent | None,
    console: Console | None,
    timeout: float,
    sup: Supervisor | None = None,
) -> DemoResult:
    """Start a run and follow its committed events until it ends, showing progress live."""
    run_id = uuid.uuid4()
    progress = RunProgress(str(run_id))
    feed = await client.follow(run_id)
    started = time.monotonic()
    try:
        reply = await client.start_run(workflow, input, intent=intent, run_id=run_id)
        if not reply.ok:
            raise DemoError(f"the coordinator refused the run: {reply.error}")
        live = Live(progress.table(), console=console, refresh_per_second=12) if console else None
        if live:
            live.start()
        try:
            while not progress.done:
                remaining = timeout - (time.monotonic() - started)
                if remaining <= 0:
                    raise DemoError(f"run {run_id} did not finish within {timeout:.0f}s")
                if sup is not None and sup.exited():
                    name, code = next(iter(sup.exited().items()))
                    raise DemoError(f"the {name} process exited with code {code} mid-run")
                try:
                    notice = await feed.next(timeout=min(remaining, 0.5))
                except NatsTimeoutError:  # nothing new yet
                    continue
                progress.apply(notice)
                if live:
                    live.update(progress.table())
        finally:
            if live:
                live.update(progress.table())
                live.stop()
    finally:
        await feed.close()
    return DemoResult(run_id, progress, time.monotonic() - started)


async def start_services(settings: Settings, startup_timeout: float = 30.0) -> Supervisor:
    sup = Supervisor(settings)
    try:
        sup.ensure_nats()
        sup.start_all()
    except Exception:
        sup.stop_all()
        raise
    return sup
