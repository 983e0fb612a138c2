"""Helpers for the fault tests: services as killable processes, a seeded fault driver, and the
invariants a run's log and the views must keep whatever was killed.

Nothing here reaches into cairn's internals: processes are started as the Supervisor starts
them and killed with SIGKILL; facts are read back from the event store, the views and NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from cairn.events import (
    CostCharged,
    Event,
    ResultIgnored,
    RunCancelled,
    RunCompleted,
    RunFailed,
    TaskCompleted,
    Usage,
)
from cairn.runtime.embedded import EmbeddedNats
from cairn.runtime.eventlog.store import EventStore
from cairn.runtime.supervisor import EXAMPLE_AGENTS, Supervisor

TESTS_DIR = Path(__file__).resolve().parent
TERMINAL = (RunCompleted, RunFailed, RunCancelled)

# Short deadlines so a killed holder's task comes back in seconds, not the default 30 s.
AGENT_ENV = {
    "CAIRN_LLM": "offline",
    "CAIRN_AGENT_ACK_WAIT": "2",
    "CAIRN_AGENT_SHUTDOWN_GRACE": "1",
}
# How long results held by a killed coordinator stay invisible to the restarted one.
COORDINATOR_ENV = {"CAIRN_RESULT_ACK_WAIT": "2"}

T = TypeVar("T")

# What each service logs once it serves (agents: see `Cluster.is_ready`).
READY_LINES = {"coordinator": "coordinator ready:", "projections": "projecting "}


async def eventually(
    probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.02
) -> T:
    """Call a cheap probe until it returns something truthy; return that, or fail after timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = probe()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


async def eventually_async(
    probe: Callable[[], Awaitable[T | None]], timeout: float, what: str, interval: float = 0.02
) -> T:
    """`eventually` for a probe that has to ask over the network (NATS)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


# -- processes ------------------------------------------------------------------------------


def slow_agent_env(name: str, delay: float, marks: Path, **extra: str) -> dict[str, str]:
    """Environment for `python -m slow_agent` serving the example agent `name`."""
    path = [str(TESTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {
        **AGENT_ENV,
        "PYTHONPATH": os.pathsep.join(path),
        "CAIRN_SLOW_AGENT": name,
        "CAIRN_SLOW_DELAY": str(delay),
        "CAIRN_SLOW_MARKS": str(marks),
        **extra,
    }


@dataclass
class Cluster:
    """The services of one test, each startable again under its name after a SIGKILL."""

    supervisor: Supervisor
    nats: EmbeddedNats | None = None  # given: "nats" is one more victim
    specs: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    kills: Counter[str] = field(default_factory=Counter)
    starts: Counter[str] = field(default_factory=Counter)

    def start(self, name: str, module: str, env: dict[str, str] | None = None) -> int:
        self.specs[name] = (module, env or {})
        return self.restart(name)

    async def start_core(self) -> None:
        """The coordinator, and once it has created the event store, the projection runner.

        Not both at once: two processes opening a fresh SQLite store together can fail (see
        `test_faults.test_services_opening_a_fresh_store_together_all_start`).
        """
        self.start("coordinator", "cairn.coordinator", dict(COORDINATOR_ENV))
        await self.wait_ready()
        self.start("projections", "cairn.projections")

    def start_slow_agents(
        self,
        marks: Path,
        delay: float,
        replicas: int = 1,
        agents: Iterable[str] = EXAMPLE_AGENTS,
        **env: str,
    ) -> list[str]:
        marks.mkdir(parents=True, exist_ok=True)
        names = []
        for agent in agents:
            for i in range(replicas):
                name = f"agent-{agent}-{i}"
                self.start(name, "slow_agent", slow_agent_env(agent, delay, marks, **env))
                names.append(name)
        return names

    def pid(self, name: str) -> int:
        return self.supervisor.processes[name].pid

    def name_of(self, pid: int) -> str:
        return next(n for n, p in self.supervisor.processes.items() if p.pid == pid)

    def kill(self, name: str) -> None:
        """SIGKILL: no handler runs, nothing is flushed, acked or handed back."""
        self.kills[name.rsplit("-", 1)[0] if name.startswith("agent-") else name] += 1
        if name == "nats":
            assert self.nats is not None
            self.nats.kill()
            return
        proc = self.supervisor.processes[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def restart(self, name: str) -> int:
        if name == "nats":  # same port and store: clients find it again by themselves
            assert self.nats is not None
            self.nats = EmbeddedNats(self.nats.store_dir, port=self.nats.port).start()
            assert self.nats.process is not None
            return self.nats.process.pid
        module, env = self.specs[name]
        self.starts[name] += 1
        return self.supervisor.start(name, module, env).pid

    def log(self, name: str) -> str:
        try:
            return (self.supervisor.settings.home / "logs" / f"{name}.log").read_text()
        except FileNotFoundError:
            return ""

    def is_ready(self, name: str) -> bool:
        """Whether the latest start of `name` has said it is ready (each start says it once)."""
        marker = READY_LINES.get(name, " ready: consumer ")  # agents: bound to their consumer
        return self.log(name).count(marker) >= self.starts[name]

    async def wait_ready(self, timeout: float = 30) -> None:
        """Until every service has said it is ready, or one has exited."""

        def ready() -> bool:
            assert not self.exited(), {n: self.log(n)[-600:] for n in self.exited()}
            return all(self.is_ready(name) for name in self.specs)

        await eventually(ready, timeout, "every service to be ready")

    def stop(self, name: str, timeout: float = 10.0) -> None:
        proc = self.supervisor.processes[name]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)

    def close(self) -> None:
        """Stop every service, then a NATS server this cluster restarted (its last one)."""
        self.supervisor.stop_all(timeout=5)
        if self.nats is not None and self.kills["nats"]:
            self.nats.stop()

    def running(self) -> list[str]:
        return [n for n, p in self.supervisor.processes.items() if p.poll() is None]

    def exited(self) -> dict[str, int]:
        return self.supervisor.exited()


# -- what the slow agents wrote down --------------------------------------------------------


@dataclass(frozen=True)
class Mark:
    """One task start by one agent process."""

    pid: int
    agent_id: str
    task_id: str
    step: str
    attempt: int
    delivery: int
    at: float


def read_marks(folder: Path) -> list[Mark]:
    marks = [Mark(**json.loads(p.read_text())) for p in folder.glob("*.json")]
    return sorted(marks, key=lambda m: m.at)


# -- the log --------------------------------------------------------------------------------


class LogFollower:
    """Reads the event store's log as it grows: each run's events, in order."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.position = 0
        self.events: dict[uuid.UUID, list[Event]] = {}

    def poll(self) -> LogFollower:
        while batch := self.store.read_log(self.position, limit=5000):
            for item in batch:
                self.events.setdefault(item.event.run_id, []).append(item.event)
            self.position = batch[-1].position
        return self

    def terminal(self, run_id: uuid.UUID) -> Event | None:
        return next((e for e in self.events.get(run_id, []) if isinstance(e, TERMINAL)), None)

    def all_terminal(self, run_ids: Iterable[uuid.UUID]) -> bool:
        self.poll()
        return all(self.terminal(r) is not None for r in run_ids)

    def of_type(self, run_id: uuid.UUID, kind: type[Event]) -> list[Any]:
        return [e for e in self.events.get(run_id, []) if isinstance(e, kind)]

    async def wait_terminal(self, run_ids: Iterable[uuid.UUID], timeout: float) -> None:
        ids = list(run_ids)

        def unfinished() -> list[str]:
            self.poll()
            return [
                f"{r} ({' '.join(e.type_name() for e in self.events.get(r, [])[-4:])})"
                for r in ids
                if self.terminal(r) is None
            ]

        try:
            await eventually(lambda: not unfinished(), timeout, "every run to end")
        except AssertionError:
            raise AssertionError(f"runs still going: {unfinished()}") from None


@dataclass
class LogSummary:
    runs: int = 0
    completed: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    events: int = 0
    ignored: int = 0
    charges: int = 0
    charged_usd: Decimal = Decimal(0)
    by_run_usd: dict[str, Decimal] = field(default_factory=dict)


# Events that may follow a run's end: results that came late or twice, and what recorded them.
AFTER_THE_END = frozenset({"ResultIgnored", "ResultReceived"})


def usage_of(events: list[Event], done: TaskCompleted) -> list[Usage]:
    """The usage of the result a TaskCompleted accepted: on the event itself, or (where results
    are recorded as they arrive) on the last ResultReceived of that task before it."""
    usage: list[Usage] | None = getattr(done, "usage", None)
    if usage is not None:
        return usage
    received = [
        e
        for e in events[: events.index(done)]
        if e.type_name() == "ResultReceived" and getattr(e, "task_id", None) == done.task_id
    ]
    assert received, f"no result recorded for {done.task_id}"
    found: list[Usage] = getattr(received[-1], "usage", [])
    return found


def check_log(events_by_run: dict[uuid.UUID, list[Event]]) -> LogSummary:
    """The invariants every run's history keeps, whatever was killed meanwhile.

    - exactly one terminal event, and after it nothing but late or repeated results, ignored;
    - at most one TaskCompleted per (step, attempt), and per step; a completed run has one for
      every step of its workflow;
    - each task's charges come from one decision: one contiguous block of CostCharged, one
      charge per model the completed result reported.
    """
    summary = LogSummary()
    for run_id, events in events_by_run.items():
        summary.runs += 1
        summary.events += len(events)
        names = [e.type_name() for e in events]
        ends = [i for i, e in enumerate(events) if isinstance(e, TERMINAL)]
        assert len(ends) == 1, f"run {run_id}: terminal events at {ends}: {names}"
        after = events[ends[0] + 1 :]
        assert all(e.type_name() in AFTER_THE_END for e in after), f"run {run_id}: {names}"
        terminal = events[ends[0]]
        completions = [e for e in events if isinstance(e, TaskCompleted)]
        per_attempt = Counter((c.step, c.attempt) for c in completions)
        per_step = Counter(c.step for c in completions)
        assert max(per_attempt.values(), default=0) <= 1, f"run {run_id}: {per_attempt}"
        assert max(per_step.values(), default=0) <= 1, f"run {run_id}: {per_step}"
        if isinstance(terminal, RunCompleted):
            summary.completed += 1
            workflow_steps = {s.name for s in events[0].workflow.steps}  # type: ignore[attr-defined]
            assert set(per_step) == workflow_steps, f"run {run_id}: {per_step}"
        elif isinstance(terminal, RunFailed):
            summary.failed[str(run_id)] = f"{terminal.reason}: {terminal.error}"

        blocks: list[str] = []
        for event in events:
            if isinstance(event, CostCharged):
                if not blocks or blocks[-1] != event.task_id:
                    blocks.append(event.task_id)
            elif blocks and blocks[-1] != "":
                blocks.append("")
        repeated = [t for t, n in Counter(b for b in blocks if b).items() if n > 1]
        assert not repeated, f"run {run_id}: tasks charged by more than one decision: {repeated}"
        charges = [e for e in events if isinstance(e, CostCharged)]
        for done in completions:
            models = Counter(c.model for c in charges if c.task_id == done.task_id)
            reported = Counter(u.model for u in usage_of(events, done))
            assert models == reported, (done.task_id, models, reported)
        summary.charges += len(charges)
        run_usd = sum((c.amount_usd for c in charges), Decimal(0))
        summary.by_run_usd[str(run_id)] = run_usd
        summary.charged_usd += run_usd
        summary.ignored += sum(isinstance(e, ResultIgnored) for e in events)
    return summary


def table_rows(path: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every table of a views file, rows sorted: two views files compare equal row for row."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        names = [
            r[0]
            for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")
        ]
        return {n: sorted(db.execute(f"SELECT * FROM {n}").fetchall(), key=repr) for n in names}


# -- the fault driver -----------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    delay: float  # seconds after the previous fault
    victim: str


def chaos_schedule(
    seed: int,
    agents: list[str],
    *,
    agent_kills: int,
    coordinator_kills: int,
    projection_kills: int,
    nats_kills: int = 0,
    spacing: tuple[float, float],
) -> list[Fault]:
    """A reproducible list of SIGKILLs: who, and how long after the previous one.

    The coordinator's kills fall in the first two thirds, so they land while runs are busy.
    """
    rng = random.Random(seed)
    total = agent_kills + coordinator_kills + projection_kills + nats_kills
    early = max(coordinator_kills, (2 * total) // 3)
    coordinator_slots = set(rng.sample(range(early), coordinator_kills))
    others = [rng.choice(agents) for _ in range(agent_kills)]
    others += ["projections"] * projection_kills + ["nats"] * nats_kills
    rng.shuffle(others)
    victims = iter(others)
    return [
        Fault(
            round(rng.uniform(*spacing), 3),
            "coordinator" if i in coordinator_slots else next(victims),
        )
        for i in range(total)
    ]


@dataclass
class ChaosLog:
    applied: list[tuple[float, str]] = field(default_factory=list)
    skipped: int = 0


async def drive(
    cluster: Cluster, schedule: list[Fault], done: Callable[[], bool], log: ChaosLog
) -> None:
    """Apply the schedule: SIGKILL each victim and start it again at once. Stops early once
    `done()` (every run has ended): faults after that would test nothing."""
    started = time.monotonic()
    for number, fault in enumerate(schedule):
        await asyncio.sleep(fault.delay)  # the schedule's pacing, not a wait for consistency
        if done():
            log.skipped = len(schedule) - number
            return
        cluster.kill(fault.victim)
        cluster.restart(fault.victim)
        log.applied.append((round(time.monotonic() - started, 2), fault.victim))
