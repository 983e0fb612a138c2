"""`cairn up`'s stack: the home's lock, the supervised processes (NATS, the coordinator, the
projection runner, the agents and their replicas, the HTTP API), restarts shown as they
happen, and one orderly stop on Ctrl-C, SIGTERM or a closed terminal (SIGHUP).

`cairn demo` shares two pieces: the `cairn up` that holds a home (`running_up`) and waiting
for the coordinator to answer (`until_answering`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlparse

from rich.console import Console

from cairn.cli.demo import DemoError, stack_credentials
from cairn.cli.plain import clean
from cairn.runtime.client import CairnClient
from cairn.runtime.homelock import Holder, HomeLock, holder_of
from cairn.runtime.restarts import forget_restarts
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import (
    EXAMPLE_AGENTS,
    Crashed,
    GaveUpError,
    Restarted,
    RestartPolicy,
    Supervisor,
)

UP_COMMAND = "cairn up"
# Each start of a process writes a fresh log; this many earlier ones are kept beside it.
KEEP_LOGS = 5
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
MAX_REPLICAS = 32
# How long the coordinator may take to answer at start (restarts after crashes included).
STARTUP_TIMEOUT = 120.0


class ReplicasError(ValueError):
    """A `--replicas` value cairn cannot use; the message names it and the fix."""


def parse_replicas(values: list[str]) -> dict[str, int]:
    """`["researcher=2"]` → `{"researcher": 2}`; each name one of the example agents."""
    replicas: dict[str, int] = {}
    for value in values:
        name, _, count = value.partition("=")
        name = name.strip()
        if name not in EXAMPLE_AGENTS:
            raise ReplicasError(
                f"--replicas {value!r} names no agent of cairn up: use NAME=COUNT with NAME "
                f"one of {', '.join(EXAMPLE_AGENTS)}"
            )
        try:
            number = int(count)
            if not 1 <= number <= MAX_REPLICAS:
                raise ValueError
        except ValueError:
            raise ReplicasError(
                f"--replicas {value!r} needs a count from 1 to {MAX_REPLICAS} after the '=' "
                f"(e.g. {name}=2)"
            ) from None
        replicas[name] = number
    return replicas


def running_up(home: Path, timeout: float = 30.0) -> Holder | None:
    """The `cairn up` that holds `home`, once its NATS URL is known (it may be starting);
    None when no `cairn up` holds it."""
    deadline = time.monotonic() + timeout
    while True:
        holder = holder_of(home)
        if holder is None or holder.command != UP_COMMAND:
            return None
        if holder.nats_url or time.monotonic() > deadline:
            return holder
        time.sleep(0.1)


async def until_answering(
    client: CairnClient, timeout: float, log: Path, stop: asyncio.Event | None = None
) -> bool:
    """Ping until a coordinator answers (True) or `stop` is set (False); DemoError after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while stop is None or not stop.is_set():
        try:
            await client.ping(timeout=0.5)
            return True
        except Exception:
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the coordinator did not answer within {timeout:.0f}s; see {log}"
                ) from None
            await asyncio.sleep(0.05)
    return False


class Stack:
    """One `cairn up`, holding its home's lock from `start` until `stop`."""

    def __init__(
        self,
        settings: Settings,
        credentials: Path | None,
        replicas: Mapping[str, int],
        say: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.replicas = dict(replicas)
        self.say = say
        self.policy = RestartPolicy.from_settings(settings)
        self.lock = HomeLock(settings.home)
        self.sup = Supervisor(
            settings,
            credentials=stack_credentials(settings, credentials),
            keep_logs=KEEP_LOGS,
            tied=True,
        )
        self.gave_up: GaveUpError | None = None

    def start(self) -> None:
        """Take the home (HomeLockedError when another process holds it), then start NATS
        and every service but the HTTP API (`serve.start_dashboard`)."""
        self.lock.acquire(UP_COMMAND, self.settings.nats_url)
        self.sup.ensure_nats()
        self.lock.set_nats_url(self.sup.settings.resolved_nats_url())
        self.sup.start_all(replicas=self.replicas)

    async def keep_up(self, stop: asyncio.Event) -> None:
        """Restart what crashes until `stop` is set; on giving up, keep why and set it."""
        while not stop.is_set():
            try:
                for event in self.sup.watch(self.policy):
                    self.say(self._line(event))
            except GaveUpError as exc:
                self.gave_up = exc
                stop.set()
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)

    def _line(self, event: Crashed | Restarted) -> str:
        text = event.message(self.policy) if isinstance(event, Crashed) else event.message()
        return f"restart: {text}"

    def pin_dashboard_port(self) -> None:
        """A restarted HTTP server listens where the first one did (it may have been given
        any free port), so the dashboard's address stays as shown."""
        from cairn.projections.http import url_file

        with contextlib.suppress(OSError, ValueError):
            port = urlparse(url_file(self.sup.settings).read_text().strip()).port
            if port and "http" in self.sup.specs:
                self.sup.specs["http"].env["CAIRN_HTTP_PORT"] = str(port)

    def stop(self) -> None:
        from cairn.projections.http import url_file

        try:
            self.sup.stop_all()
            if "http" in self.sup.processes:  # uvicorn re-raises SIGTERM before it tidies up
                url_file(self.sup.settings).unlink(missing_ok=True)
        finally:
            self.lock.release()


def safe_printer(console: Console) -> Callable[[str], None]:
    """Print plain lines to `console`; a terminal that is gone (hang-up) is no error."""

    def say(line: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            console.print(clean(line), markup=False, highlight=False, soft_wrap=True)

    return say


async def run_up(
    settings: Settings,
    credentials: Path | None,
    replicas: Mapping[str, int],
    console: Console,
) -> GaveUpError | None:
    """Run the stack until a stop signal (None) or a child it gave up on (the error)."""
    from cairn.cli.serve import dashboard_lines, start_dashboard

    say = safe_printer(console)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:  # a closed terminal (SIGHUP) stops everything in order too
        loop.add_signal_handler(sig, stop.set)
    stack = Stack(settings, credentials, replicas, say)
    keeper: asyncio.Task[None] | None = None
    try:
        forget_restarts(settings.home)  # the dashboard shows this start's restarts
        stack.start()
        sup = stack.sup
        dashboard = start_dashboard(sup)
        keeper = asyncio.create_task(stack.keep_up(stop))
        client = await CairnClient.connect(sup.settings.nats_endpoint(), "cairn-up")
        try:
            log = sup.log_path("coordinator")
            answered = await until_answering(client, STARTUP_TIMEOUT, log, stop)
        finally:
            await client.close()
        if answered:
            lines = await dashboard_lines(sup, dashboard)
            stack.pin_dashboard_port()
            say(f"cairn is up · NATS {sup.settings.resolved_nats_url()}")
            say(f"data in {settings.home}, logs in {settings.home / 'logs'} (a new one each start)")
            for name, proc in sup.processes.items():
                say(f"  {name}: pid {proc.pid}")
            for line in lines:
                say(line)
            say('start a run:  cairn run research-report --input \'{"topic": "tides"}\' --wait')
            say("a process that crashes is started again (shown here as it happens).")
            say("Ctrl-C stops everything (so do SIGTERM and closing the terminal).")
        await stop.wait()
    finally:
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        stack.stop()
    return stack.gave_up
