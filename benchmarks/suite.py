"""`cairn bench`: what one step costs and how much work cairn gets through, next to the limits
of the machine it runs on and to two peers, all measured in one run.

Everything happens in a scratch folder: its own `nats-server`, event store and views, with the
coordinator and echo agents (`cairn.agents.examples.echo`) as separate processes, as in production.
The result is one table (`bench_report.Report`); a figure that could not be measured has no
value and says why in its note. Targets stand beside the figures; nothing here asserts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from cairn.benchmarks.logwork import LogFigures, echo_steps, measure_log
from cairn.benchmarks.report import (
    Report,
    Row,
    load_average,
    machine_info,
    not_measured,
    number,
    percentile,
    row,
    source_commit,
)
from cairn.events import (
    TASKS_STREAM,
    ResultReceived,
    RunStarted,
    TaskCompleted,
    TaskDispatched,
    agent_consumer,
)
from cairn.runtime.client import CairnClient
from cairn.runtime.connection import connect
from cairn.runtime.embedded import EmbeddedNats
from cairn.runtime.eventlog.store import EventStore
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import Supervisor

Progress = Callable[[str], None]

PIPELINE = "bench-pipeline"
CHAIN = "bench-chain"
IDLE = "bench-idle"
ECHO = "echo"
ECHO_MODULE = "cairn.agents.examples.echo"
PEERS = {"langgraph": "LangGraph", "dbos": "DBOS"}
# Pull loops per agent replica (the worker's default), for knowing when replicas are ready.
AGENT_LOOPS = 4
RUN_TIMEOUT_S = 60.0


class BenchError(RuntimeError):
    """A measurement could not be taken; the message says which and why."""


@dataclass(frozen=True)
class Scale:
    """How much of each measurement one bench does."""

    name: str
    samples: int  # round trips, publishes and commits for the limits
    pipeline_runs: int  # three-step runs, one at a time: two step intervals each
    chain_steps: int  # steps of the one long run
    throughput_s: float  # seconds of the closed loop of concurrent runs
    history_events: int  # size of the generated history for the log rows
    memory_runs: int  # finished, then active runs for the memory rows
    peer_runs: int
    concurrent_runs: int = 50
    replicas: int = 4


FULL = Scale(
    "full",
    samples=1000,
    pipeline_runs=300,
    chain_steps=50,
    throughput_s=20.0,
    history_events=100_000,
    memory_runs=1000,
    peer_runs=200,
)
QUICK = Scale(
    "quick",
    samples=100,
    pipeline_runs=20,
    chain_steps=10,
    throughput_s=3.0,
    history_events=5_000,
    memory_runs=100,
    peer_runs=20,
)


def rss_mb(pid: int) -> float:
    """A process's resident set size in MB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """A process's user and system CPU time, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_workflows(chain_steps: int) -> dict[str, dict[str, Any]]:
    """The bench's workflows, written to the coordinator's workflow folder."""
    return {
        PIPELINE: {"name": PIPELINE, "steps": echo_steps(3, ECHO)},
        CHAIN: {
            "name": CHAIN,
            "steps": echo_steps(chain_steps, ECHO),
            "limits": {"max_steps": max(50, chain_steps)},
        },
        # No agent serves this capability: its runs stay active, each with a timer set.
        IDLE: {"name": IDLE, "steps": [{"name": "wait", "capability": IDLE, "timeout_s": 3600}]},
    }


# -- the limits ---------------------------------------------------------------------------------


async def nats_round_trips(url: str, samples: int) -> list[float]:
    """Core NATS request/reply between two connections, in ms."""
    requester = await connect(url, "cairn-bench-requester")
    responder = await connect(url, "cairn-bench-responder")
    try:

        async def answer(msg: Msg) -> None:
            await msg.respond(msg.data)

        await responder.subscribe("cairn-bench.echo", cb=answer)
        await responder.flush()
        payload = b"x" * 256
        for _ in range(20):
            await requester.request("cairn-bench.echo", payload, timeout=5)
        times = []
        for _ in range(samples):
            started = time.perf_counter()
            await requester.request("cairn-bench.echo", payload, timeout=5)
            times.append((time.perf_counter() - started) * 1000)
        return times
    finally:
        await requester.close()
        await responder.close()


async def jetstream_publishes(url: str, samples: int) -> list[float]:
    """JetStream publish with ack (file storage, a message id header as cairn sends), in ms."""
    nc = await connect(url, "cairn-bench-js")
    try:
        js = nc.jetstream()
        await js.add_stream(name="CAIRN_BENCH", subjects=["cairn-bench.js.>"])
        payload = b"x" * 512
        times = []
        for i in range(samples + 20):
            started = time.perf_counter()
            await js.publish("cairn-bench.js.t", payload, headers={"Nats-Msg-Id": f"m{i}"})
            if i >= 20:
                times.append((time.perf_counter() - started) * 1000)
        await js.delete_stream("CAIRN_BENCH")
        return times
    finally:
        await nc.close()


def sqlite_commits(path: Path, samples: int) -> tuple[list[float], str]:
    """One row inserted and committed per transaction, WAL with SQLite's default synchronous
    level (what the event store runs with: eventsourcing sets WAL and leaves synchronous
    alone), in ms; and the synchronous level seen."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        level = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(
            conn.execute("PRAGMA synchronous").fetchone()[0], "?"
        )
        conn.execute(
            "CREATE TABLE events (run TEXT, seq INTEGER, topic TEXT, state BLOB, "
            "PRIMARY KEY (run, seq))"
        )
        state = b"x" * 600
        times = []
        for i in range(samples + 20):
            started = time.perf_counter()
            conn.execute("BEGIN")
            conn.execute("INSERT INTO events VALUES (?, ?, ?, ?)", ("run", i, "T@1", state))
            conn.execute("COMMIT")
            if i >= 20:
                times.append((time.perf_counter() - started) * 1000)
        return times, level
    finally:
        conn.close()


# -- runs through real processes ----------------------------------------------------------------


class RunEnds:
    """Futures for runs' ends, resolved from the live feed (subjects only, no decoding)."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[str]] = {}
        self.finished = 0

    async def subscribe(self, nc: Client) -> None:
        for kind in ("RunCompleted", "RunFailed", "RunCancelled"):
            await nc.subscribe(f"cairn.event.*.{kind}", cb=self._on_end)
        await nc.flush()

    def expect(self, run_id: uuid.UUID) -> asyncio.Future[str]:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting[str(run_id)] = future
        return future

    async def _on_end(self, msg: Msg) -> None:
        _, _, run_id, kind = msg.subject.split(".", 3)
        self.finished += 1
        future = self._waiting.pop(run_id, None)
        if future is not None and not future.done():
            future.set_result(kind)


async def run_once(client: CairnClient, ends: RunEnds, workflow: str, value: int) -> uuid.UUID:
    run_id = uuid.uuid4()
    ended = ends.expect(run_id)
    reply = await client.start_run(workflow, {"value": value}, run_id=run_id)
    if not reply.ok:
        raise BenchError(f"the coordinator refused a {workflow} run: {reply.error}")
    kind = await asyncio.wait_for(ended, RUN_TIMEOUT_S)
    if kind != "RunCompleted":
        raise BenchError(f"a {workflow} run ended with {kind}; see the coordinator's log")
    return run_id


def dispatch_intervals(store: EventStore, run_ids: Sequence[uuid.UUID]) -> list[float]:
    """ms from each step's TaskDispatched to the next step's, within each run."""
    intervals = []
    for run_id in run_ids:
        times = [e.at for e in store.load(run_id) if isinstance(e, TaskDispatched)]
        intervals += [(b - a).total_seconds() * 1000 for a, b in itertools.pairwise(times)]
    return intervals


# The parts of a step, from the recorded times: the coordinator's TaskDispatched, the agent's
# started_at and finished_at (in ResultReceived), and the next batch's time (the next
# TaskDispatched, the same as ResultReceived.at).
SEGMENTS = (
    "coordinator commits and publishes, NATS delivers, the agent picks the task up",
    "the agent validates, handles and encodes",
    "the agent publishes, JetStream stores, NATS delivers, the coordinator picks it up",
)


def step_segments(store: EventStore, run_ids: Sequence[uuid.UUID]) -> list[list[float]]:
    """For each of `SEGMENTS`, its ms in every step."""
    parts: list[list[float]] = [[] for _ in SEGMENTS]
    for run_id in run_ids:
        dispatched: dict[str, datetime] = {}
        for event in store.load(run_id):
            if isinstance(event, TaskDispatched):
                dispatched[event.task_id] = event.at
            elif isinstance(event, ResultReceived):
                times = (
                    dispatched[event.task_id],
                    event.started_at,
                    event.finished_at,
                    event.at,
                )
                for i, (a, b) in enumerate(itertools.pairwise(times)):
                    parts[i].append((b - a).total_seconds() * 1000)
    return parts


class Services:
    """The coordinator and echo agents as processes against one NATS server and store."""

    def __init__(self, settings: Settings, nats_pid: int | None = None) -> None:
        self.settings = settings
        self.supervisor = Supervisor(settings)
        self.replicas = 0
        self.nats_pid = nats_pid

    @property
    def coordinator_pid(self) -> int:
        return self.supervisor.processes["coordinator"].pid

    def cpu_seconds(self) -> dict[str, float]:
        """User and system CPU time so far: the coordinator, the agents together, NATS and
        this process (which plays the clients)."""
        pids = {"coordinator": [self.coordinator_pid], "bench clients": [os.getpid()]}
        pids["agents"] = [p.pid for n, p in self.supervisor.processes.items() if n != "coordinator"]
        if self.nats_pid is not None:
            pids["nats-server"] = [self.nats_pid]
        return {name: sum(cpu_seconds(pid) for pid in group) for name, group in pids.items()}

    def check_alive(self) -> None:
        dead = self.supervisor.exited()
        if dead:
            name, code = next(iter(dead.items()))
            raise BenchError(
                f"the {name} process exited with code {code}: {self.supervisor.log_tail(name)}"
            )

    async def start(self, client: CairnClient) -> None:
        self.supervisor.start("coordinator", "cairn.coordinator")
        await client.wait_ready(timeout=30)
        await self.add_replicas(client, 1)

    async def add_replicas(self, client: CairnClient, count: int) -> None:
        for _ in range(count):
            self.replicas += 1
            self.supervisor.start(f"agent-echo-{self.replicas}", ECHO_MODULE)
        # Ready when every pull loop of every replica has a request waiting on the consumer.
        js = client.nc.jetstream()
        deadline = time.monotonic() + 30
        while True:
            self.check_alive()
            with contextlib.suppress(NotFoundError):
                info = await js.consumer_info(TASKS_STREAM, agent_consumer(ECHO))
                if (info.num_waiting or 0) >= self.replicas * AGENT_LOOPS:
                    return
            if time.monotonic() > deadline:
                raise BenchError(f"{self.replicas} echo agent(s) did not get ready within 30 s")
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        self.supervisor.stop_all(timeout=10)


@dataclass
class LiveFigures:
    """What the phases with real processes measured."""

    rtt_ms: list[float] = field(default_factory=list)
    publish_ms: list[float] = field(default_factory=list)
    pipeline_ms: list[float] = field(default_factory=list)
    chain_ms: list[float] = field(default_factory=list)
    segments_ms: list[list[float]] = field(default_factory=list)
    cpu_ms_per_step: dict[str, float] = field(default_factory=dict)
    steps_per_s: float | None = None
    throughput: dict[str, Any] = field(default_factory=dict)
    rss_idle: float | None = None
    rss_finished: float | None = None
    rss_finished_end: float | None = None
    finished_at_sample: int = 0
    finished_end: int = 0
    rss_active: float | None = None
    active_runs: int = 0
    errors: dict[str, str] = field(default_factory=dict)


async def measure_live(workdir: Path, scale: Scale, progress: Progress) -> LiveFigures:
    """The limits of NATS, then the phases through a real coordinator and echo agents. A phase
    that fails is recorded in `errors` under its name; the ones after it go on if they can."""
    figures = LiveFigures()
    home = workdir / "home"
    (home / "workflows").mkdir(parents=True, exist_ok=True)
    for name, spec in bench_workflows(scale.chain_steps).items():
        (home / "workflows" / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    async def phase(name: str, work: Awaitable[None]) -> bool:
        try:
            await work
        except Exception as exc:  # a failed measurement is a row that says why
            figures.errors[name] = f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc)
            return False
        return True

    try:
        nats = EmbeddedNats(workdir / "nats").start()
    except Exception as exc:
        figures.errors["limits"] = figures.errors["services"] = f"nats-server: {exc}"
        return figures
    pid = nats.process.pid if nats.process else None
    services = Services(Settings(home=home, nats_url=nats.url), nats_pid=pid)
    try:
        progress("limits: NATS round trips and JetStream publishes")
        await phase("limits", _limits(nats.url, scale, figures))
        async with await CairnClient.connect(nats.url, "cairn-bench") as client:
            progress("starting the coordinator and one echo agent")
            ends = RunEnds()
            if not await phase("services", _start(client, ends, services, figures)):
                return figures
            await phase("per_step", _per_step(client, ends, services, scale, figures, progress))
            await phase("throughput", _throughput(client, ends, services, scale, figures, progress))
            await phase("active", _active_runs(client, services, scale, figures, progress))
    finally:
        services.stop()
        nats.stop()
    return figures


async def _limits(url: str, scale: Scale, figures: LiveFigures) -> None:
    figures.rtt_ms = await nats_round_trips(url, scale.samples)
    figures.publish_ms = await jetstream_publishes(url, scale.samples)


async def _start(
    client: CairnClient, ends: RunEnds, services: Services, figures: LiveFigures
) -> None:
    await services.start(client)
    await ends.subscribe(client.nc)
    figures.rss_idle = rss_mb(services.coordinator_pid)


async def _per_step(
    client: CairnClient,
    ends: RunEnds,
    services: Services,
    scale: Scale,
    figures: LiveFigures,
    progress: Progress,
) -> None:
    progress(f"per step: {scale.pipeline_runs} three-step runs, one at a time")
    for i in range(5):  # connections, caches, the store's first pages
        await run_once(client, ends, PIPELINE, -i)
    run_ids = [await run_once(client, ends, PIPELINE, i) for i in range(scale.pipeline_runs)]
    progress(f"per step: one run of {scale.chain_steps} steps")
    chain = await run_once(client, ends, CHAIN, 0)
    services.check_alive()
    store = EventStore.from_settings(services.settings)
    try:
        figures.pipeline_ms = dispatch_intervals(store, run_ids)
        figures.chain_ms = dispatch_intervals(store, [chain])
        figures.segments_ms = step_segments(store, run_ids)
    finally:
        store.close()


async def _throughput(
    client: CairnClient,
    ends: RunEnds,
    services: Services,
    scale: Scale,
    figures: LiveFigures,
    progress: Progress,
) -> None:
    await services.add_replicas(client, scale.replicas - services.replicas)
    store = EventStore.from_settings(services.settings)
    position = store.last_position()
    progress(
        f"throughput: {scale.concurrent_runs} concurrent three-step runs, "
        f"{scale.replicas} echo replicas, {scale.throughput_s:g} s"
    )
    loop = asyncio.get_running_loop()
    warmup = min(2.0, scale.throughput_s / 4)
    window_start = time.time() + warmup
    deadline = loop.time() + warmup + scale.throughput_s
    started_runs = 0
    cpu_before = services.cpu_seconds()

    async def lane(lane_id: int) -> None:
        nonlocal started_runs
        while loop.time() < deadline:
            started_runs += 1
            await run_once(client, ends, PIPELINE, lane_id)
            if figures.rss_finished is None and ends.finished >= scale.memory_runs:
                figures.rss_finished = rss_mb(services.coordinator_pid)
                figures.finished_at_sample = ends.finished

    await asyncio.gather(*(lane(i) for i in range(scale.concurrent_runs)))
    cpu_after = services.cpu_seconds()
    window_end = window_start + scale.throughput_s
    services.check_alive()
    figures.finished_end = ends.finished
    figures.rss_finished_end = rss_mb(services.coordinator_pid)
    in_window = completed = starts = 0
    batches: set[datetime] = set()
    try:
        while batch := store.read_log(position, limit=5000):
            for item in batch:
                event = item.event
                if isinstance(event, TaskCompleted):
                    completed += 1
                    in_window += window_start <= event.at.timestamp() < window_end
                elif isinstance(event, ResultReceived):
                    batches.add(event.at)  # a batch's events share its time
                elif isinstance(event, RunStarted):
                    starts += 1
            position = batch[-1].position
    finally:
        store.close()
    figures.steps_per_s = in_window / scale.throughput_s
    figures.cpu_ms_per_step = {
        name: (cpu_after[name] - cpu_before.get(name, 0.0)) / max(1, completed) * 1000
        for name in cpu_after
    }
    figures.throughput = {
        "steps_in_window": in_window,
        "window_s": scale.throughput_s,
        "steps": completed,
        "runs_started": started_runs,
        "results_per_batch": completed / max(1, len(batches)),
        "commits_per_step": (len(batches) + starts) / max(1, completed),
        "runs_finished_total": ends.finished,
    }


async def _active_runs(
    client: CairnClient,
    services: Services,
    scale: Scale,
    figures: LiveFigures,
    progress: Progress,
) -> None:
    progress(f"memory: {scale.memory_runs} active runs")
    semaphore = asyncio.Semaphore(20)

    async def start(i: int) -> None:
        async with semaphore:
            reply = await client.start_run(IDLE, {"value": i})
            if not reply.ok:
                raise BenchError(f"the coordinator refused an idle run: {reply.error}")

    await asyncio.gather(*(start(i) for i in range(scale.memory_runs)))
    ping = await client.ping()
    figures.active_runs = int(ping.get("active_runs", 0))
    figures.rss_active = rss_mb(services.coordinator_pid)


# -- peers --------------------------------------------------------------------------------------


def measure_peer(name: str, workdir: Path, runs: int) -> dict[str, Any]:
    folder = workdir / "peers" / name
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "cairn.benchmarks.peers", name]
    command += ["--runs", str(runs), "--dir", str(folder)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "did not finish within 300 s"}
    lines = done.stdout.strip().splitlines()
    try:
        outcome: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        return {"ok": False, "error": f"exited with {done.returncode}: {' '.join(tail)}"}
    return outcome


# -- the whole bench ----------------------------------------------------------------------------


def run_bench(workdir: Path, scale: Scale, progress: Progress | None = None) -> Report:
    """Take every measurement in `workdir` (a scratch folder on the disk to be measured) and
    return the table."""
    say = progress or (lambda _: None)
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    machine = machine_info()
    workdir.mkdir(parents=True, exist_ok=True)
    say("limits: SQLite commits")
    commits, synchronous = sqlite_commits(workdir / "commit.db", scale.samples)
    live = asyncio.run(measure_live(workdir, scale, say))
    folder = workdir / "log"
    log = measure_log(
        Settings(home=folder, store_url=str(folder / "events.db"), views_url=str(folder / "v.db")),
        scale.history_events,
        say,
    )
    peers = {}
    for name, label in PEERS.items():
        say(f"peers: {label}")
        peers[name] = measure_peer(name, workdir, scale.peer_runs)
    machine["load_end"] = load_average()
    floor = step_floor(commits, live)
    rows = [
        *limit_rows(commits, synchronous, live, floor),
        *step_rows(scale, live, floor),
        *log_rows(log),
        *memory_rows(scale, live),
        *peer_rows(live, peers),
    ]
    details = {
        "scale": asdict(scale),
        "throughput": live.throughput,
        "history": {"events": log.events, "batches": log.batches},
        "peers": {k: {n: v for n, v in p.items() if n != "intervals_ms"} for k, p in peers.items()},
        "errors": {**live.errors, **log.errors},
    }
    return Report(
        started_at=started_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
        seconds=time.perf_counter() - started,
        scale=scale.name,
        commit=source_commit(),
        machine=machine,
        rows=rows,
        details=details,
    )


def step_floor(commits: list[float], live: LiveFigures) -> float | None:
    """The sum of the three limits' medians: no step can take less."""
    if not (commits and live.rtt_ms and live.publish_ms):
        return None
    return sum(percentile(v, 50) for v in (live.rtt_ms, live.publish_ms, commits))


def limit_rows(
    commits: list[float], synchronous: str, live: LiveFigures, floor: float | None
) -> list[Row]:
    why = live.errors.get("limits", "not measured")
    rows = []
    for measure, values in (
        ("NATS request/reply round trip, p50", live.rtt_ms),
        ("JetStream publish with ack, p50", live.publish_ms),
        (f"SQLite commit (WAL, synchronous={synchronous}), p50", commits),
    ):
        if values:
            spread = f"p99 {number(percentile(values, 99))} ms; {len(values):,} samples"
            rows.append(row("limits", measure, percentile(values, 50), "ms", note=spread))
        else:
            rows.append(not_measured("limits", measure, "ms", why))
    if floor is None:
        rows.append(not_measured("limits", "floor for one step (their sum)", "ms", why))
    else:
        rows.append(row("limits", "floor for one step (their sum)", floor, "ms"))
    return rows


def step_rows(scale: Scale, live: LiveFigures, floor: float | None) -> list[Row]:
    why = live.errors.get("services") or live.errors.get("per_step", "not measured")
    section = "per step"
    measure = "TaskDispatched → next TaskDispatched, p50"
    rows = []
    if live.pipeline_ms:
        values = live.pipeline_ms
        p50 = percentile(values, 50)
        note = (
            f"{scale.pipeline_runs} three-step runs one at a time ({len(values)} intervals), "
            "1 coordinator and 1 echo agent process"
        )
        rows.append(row(section, measure, p50, "ms", at_most=1.5, note=note))
        rows.append(row(section, "… p99", percentile(values, 99), "ms", at_most=10))
        if floor:
            rows.append(row(section, "p50 ÷ floor", p50 / floor, "×"))
        else:
            rows.append(not_measured(section, "p50 ÷ floor", "×", "no floor"))
        for name, values in zip(SEGMENTS, live.segments_ms, strict=False):
            if values:
                rows.append(row(section, f"… {name}, p50", percentile(values, 50), "ms"))
    else:
        rows.append(not_measured(section, measure, "ms", why, at_most=1.5))
        rows.append(not_measured(section, "… p99", "ms", why, at_most=10))
        rows.append(not_measured(section, "p50 ÷ floor", "×", why))
    measure = f"p50 within one run of {scale.chain_steps} steps"
    if live.chain_ms:
        chain = live.chain_ms
        note = (
            f"first step {number(chain[0])} ms, last {number(chain[-1])} ms, "
            f"p99 {number(percentile(chain, 99))} ms"
        )
        rows.append(row(section, measure, percentile(chain, 50), "ms", at_most=1.5, note=note))
    else:
        rows.append(not_measured(section, measure, "ms", why, at_most=1.5))

    why = live.errors.get("services") or live.errors.get("throughput", "not measured")
    measure = f"steps/s, {scale.concurrent_runs} concurrent runs, {scale.replicas} agent replicas"
    if live.steps_per_s is None:
        rows.append(not_measured("throughput", measure, "/s", why, at_least=3000))
        return rows
    t = live.throughput
    note = (
        f"three-step runs in a closed loop: {t['steps_in_window']:,} steps completed in "
        f"{t['window_s']:g} s after warm-up; {t['results_per_batch']:.1f} results per batch, "
        f"{t['commits_per_step']:.2f} commits per step"
    )
    rows.append(row("throughput", measure, live.steps_per_s, "/s", at_least=3000, note=note))
    cpu = live.cpu_ms_per_step
    total = sum(cpu.values())
    if total:
        cores = os.cpu_count() or 1
        note = f"at most {cores * 1000 / total:,.0f} steps/s on {cores} cores at this cost"
        rows.append(row("throughput", "CPU per step, all processes", total, "ms", note=note))
        for name, ms in cpu.items():
            rows.append(row("throughput", f"… {name}", ms, "ms"))
    return rows


def log_rows(log: LogFigures) -> list[Row]:
    size = f"{log.events:,} events"
    batches = f"{log.batches:,} batches of ~{log.events // max(1, log.batches)} events"
    rows = []
    for measure, value, target, error, note in (
        ("decide + evolve, in process", log.decide_per_s, None, "append", size),
        ("EventStore.append", log.append_per_s, None, "append", f"{batches}, a commit each"),
        ("projection rebuild", log.rebuild_per_s, 100_000, "rebuild", f"{size}, all views"),
        ("replay --check", log.replay_per_s, 50_000, "replay", log.replay_note),
    ):
        if value is None:
            why = log.errors.get(error) or log.errors.get("append") or log.replay_note
            rows.append(
                not_measured("log", measure, "events/s", why or "not measured", at_least=target)
            )
        else:
            rows.append(row("log", measure, value, "events/s", at_least=target, note=note))
    return rows


def memory_rows(scale: Scale, live: LiveFigures) -> list[Row]:
    why = live.errors.get("services") or live.errors.get("throughput") or "not reached"
    runs = scale.memory_runs
    rows = []
    for measure, value, note in (
        ("coordinator RSS, idle", live.rss_idle, "after start-up"),
        (
            f"coordinator RSS, {live.finished_at_sample or runs:,} finished runs",
            live.rss_finished,
            "sampled during the throughput run",
        ),
        (
            f"coordinator RSS, {live.finished_end:,} finished runs",
            live.rss_finished_end,
            "at the end of the throughput run; each step's timeout timer stays queued until "
            "it is due (60 s here), done or not",
        ),
        (
            f"coordinator RSS, + {runs:,} active runs",
            live.rss_active,
            f"{live.active_runs:,} runs active, each waiting for a capability no agent serves",
        ),
    ):
        if value is None:
            rows.append(not_measured("memory", measure, "MB", live.errors.get("active", why)))
        else:
            rows.append(row("memory", measure, value, "MB", note=note))
    measure = "growth per 1,000 more finished runs"
    more = live.finished_end - live.finished_at_sample
    if live.rss_finished is None or live.rss_finished_end is None or more < runs:
        why = f"{why}: fewer than {runs:,} runs finished after the first sample"
        rows.append(not_measured("memory", measure, "MB", why, at_most=1.0))
    else:
        growth = (live.rss_finished_end - live.rss_finished) / more * 1000
        rows.append(row("memory", measure, growth, "MB", at_most=1.0, note="flat: ≤ 1 MB"))
    return rows


def peer_rows(live: LiveFigures, peers: dict[str, dict[str, Any]]) -> list[Row]:
    cairn_p50 = percentile(live.pipeline_ms, 50) if live.pipeline_ms else None
    rows = []
    for name, label in PEERS.items():
        outcome = peers.get(name, {})
        measure = f"{label}: step → next step, p50"
        intervals = outcome.get("intervals_ms") or []
        if not outcome.get("ok") or not intervals:
            rows.append(not_measured("peers", measure, "ms", outcome.get("error", "not run")))
            continue
        p50 = percentile(intervals, 50)
        note = (
            f"{outcome.get('setup')}; mean {number(outcome['per_step_ms'])} ms a step over "
            f"{outcome['runs']} runs"
        )
        rows.append(row("peers", measure, p50, "ms", note=note))
        if cairn_p50 is None:
            rows.append(not_measured("peers", f"cairn ÷ {label}", "×", "no cairn figure"))
        else:
            note = "below 1: cairn's step is the shorter, though it crosses two processes"
            rows.append(row("peers", f"cairn ÷ {label}, p50", cairn_p50 / p50, "×", note=note))
    return rows


__all__ = ["FULL", "QUICK", "BenchError", "Report", "Row", "Scale", "run_bench"]
