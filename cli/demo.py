"""`cairn demo` and `cairn up`: the whole system on one machine, each service its own process."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError
from rich.console import Console
from rich.live import Live
from rich.markup import escape

from cairn.cli.progress import RunProgress
from cairn.events import Budget, EventNotice, Intent, WorkflowSpec
from cairn.runtime.client import CairnClient
from cairn.runtime.roles import credentials_path, roles_for
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import EXAMPLE_AGENTS, Supervisor

DEMO_WORKFLOW = "reviewed-report"
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
        success_criteria=["every planned question is answered", f"explains {topic}"],
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


Approver = Callable[[CairnClient, EventNotice, "Live | None"], Awaitable[None]]


async def run_and_follow(
    client: CairnClient,
    workflow: str | WorkflowSpec,
    input: dict[str, Any],
    intent: Intent | None,
    console: Console | None,
    timeout: float,
    sup: Supervisor | None = None,
    approver: Approver | None = None,
    budget: Budget | None = None,
) -> DemoResult:
    """Start a run and follow its committed events until it ends, showing progress live.

    `approver` is called for each approval request (the demo's --yes, or a prompt)."""
    run_id = uuid.uuid4()
    progress = RunProgress(str(run_id))
    feed = await client.follow(run_id)
    started = time.monotonic()
    try:
        reply = await client.start_run(workflow, input, intent=intent, run_id=run_id, budget=budget)
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
                if notice.type == "ApprovalRequested" and approver is not None:
                    await approver(client, notice, live)
        finally:
            if live:
                live.update(progress.table())
                live.stop()
    finally:
        await feed.close()
    return DemoResult(run_id, progress, time.monotonic() - started)


def stack_credentials(settings: Settings, credentials: Path | None) -> Path | None:
    """The directory of per-role credentials each child of `cairn up`/`demo` connects with.

    The embedded server makes its own; on your own NATS with credentials, a directory with one
    file per role (`cairn nats-config --out DIR`) is required: the coordinator and every agent
    must never share one identity (an agent could then act as the coordinator)."""
    if credentials is None:
        if settings.nats_url and (settings.nats_creds or settings.nats_user):
            raise DemoError(
                "NATS_URL and credentials are set, but not one file per role: give --credentials "
                "DIR (the directory `cairn nats-config --out DIR` wrote), so the coordinator and "
                "each agent connect as their own role"
            )
        return None
    if not settings.nats_url:
        raise DemoError(
            "--credentials is for your own NATS server (set NATS_URL): the embedded one makes "
            "its own users"
        )
    directory = credentials.absolute()
    missing = [
        role
        for role in roles_for(EXAMPLE_AGENTS)
        if not credentials_path(directory, role).is_file()
    ]
    if missing:
        raise DemoError(
            f"{directory} holds no credentials file for {', '.join(missing)}: write them with "
            f"`cairn nats-config --out {directory}`"
        )
    return directory


async def start_services(
    settings: Settings, startup_timeout: float = 30.0, credentials: Path | None = None
) -> Supervisor:
    """NATS and every service of the demo, tied to this process (they end with it, even
    when it is killed), each start of each writing a fresh log."""
    sup = Supervisor(
        settings, credentials=stack_credentials(settings, credentials), keep_logs=5, tied=True
    )
    try:
        sup.ensure_nats()
        sup.start_all()
    except Exception:
        sup.stop_all()
        raise
    return sup


def auto_approver(name: str) -> Approver:
    """Approve every request at once, on record as `name` (the demo's --yes)."""

    async def approve(client: CairnClient, notice: EventNotice, live: Live | None) -> None:
        event = notice.event
        reply = await client.approve(
            uuid.UUID(event["run_id"]), event["step"], name, "auto-approved (--yes)"
        )
        if not reply.ok:
            raise DemoError(f"could not approve {event['step']}: {reply.error}")

    return approve


def prompt_approver(console: Console, name: str) -> Approver:
    """Ask in the terminal, showing the choices; ask again on an answer it does not know, and
    stop asking once the gate is decided elsewhere (`cairn approve`/`deny`, the dashboard)."""

    async def ask(client: CairnClient, notice: EventNotice, live: Live | None) -> None:
        event = notice.event
        context = event["context"]
        run, step = event["run_id"], event["step"]
        if live:
            live.stop()
        console.print(
            f"\n[bold yellow]approval needed[/] before [bold]{step}[/] "
            f"({event['kind']}, group {event['group']}): {escape(event['reason'])}"
        )
        console.print(f"  goal: {escape(context['intent']['goal'])}")
        console.print(f"  cost so far: ${context['cost_so_far_usd']}")
        console.print(
            f"  or from another terminal: cairn approve {run} {step} --as NAME "
            f"(or cairn deny {run} {step} --as NAME)",
            highlight=False,
        )
        lines = _TerminalLines()
        approve: bool | None = None
        try:
            while approve is None:
                console.print(escape("  approve? [y]es / [n]o: "), end="")
                answer = await lines.next_or(_decided_elsewhere(client, event["request_id"]))
                if answer is None:
                    console.print("\n  decided elsewhere; the run goes on")
                    break
                word = answer.strip().lower()
                if word in ("y", "yes"):
                    approve = True
                elif word in ("n", "no"):
                    approve = False
                else:
                    console.print(f"  answer y to approve or n to deny (not {escape(repr(word))})")
        finally:
            lines.close()
        if approve is not None:
            reply = await client.approve(
                uuid.UUID(run), step, name,
                "approved at the demo prompt" if approve else "denied at the demo prompt",
                deny=not approve,
            )  # fmt: skip
            if not reply.ok:  # decided elsewhere in the meantime
                console.print(f"  {escape(reply.error or 'refused')}")
        if live:
            live.start()

    return ask


async def _decided_elsewhere(client: CairnClient, request_id: str) -> None:
    """Return once the approval request is no longer pending."""
    while True:
        pending = await client.approvals()
        if all(a.get("request_id") != request_id for a in pending):
            return
        await asyncio.sleep(0.5)


class _TerminalLines:
    """Lines typed at the terminal, read without blocking the event loop, so a prompt can also
    end for another reason."""

    def __init__(self) -> None:
        self._fd = sys.stdin.fileno()
        self._buffer = b""
        self._eof = False
        self._ready = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(self._fd, self._read)
        self._loop = loop

    def _read(self) -> None:
        data = os.read(self._fd, 4096)
        if not data:
            self._eof = True
            self._loop.remove_reader(self._fd)
        self._buffer += data
        self._ready.set()

    def _line(self) -> str | None:
        if b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
            return line.decode(errors="replace")
        return None

    async def next_or(self, other: Awaitable[None]) -> str | None:
        """The next line; None when `other` finishes first (stdin closed: only `other`)."""
        waiting = asyncio.ensure_future(other)
        try:
            while (line := self._line()) is None:
                self._ready.clear()
                if self._eof:
                    await waiting
                    return None
                reading = asyncio.ensure_future(self._ready.wait())
                done, _ = await asyncio.wait(
                    {reading, waiting}, return_when=asyncio.FIRST_COMPLETED
                )
                reading.cancel()
                if waiting in done:
                    return None
            return line
        finally:
            waiting.cancel()

    def close(self) -> None:
        if not self._eof:
            self._loop.remove_reader(self._fd)


def waiting_notice(console: Console) -> Approver:
    """No terminal to ask in: say how to approve, and keep following the run."""

    async def tell(client: CairnClient, notice: EventNotice, live: Live | None) -> None:
        event = notice.event
        console.print(
            f"waiting for approval of {event['step']}: "
            f"cairn approve {event['run_id']} {event['step']} --as NAME"
        )

    return tell
