"""The phases through real processes: the limits of NATS, then per-step latency, throughput and
memory through a coordinator and echo agents, each phase recorded in `LiveFigures` (or, when
it fails, in its `errors`); and what a step's recorded times say about where it went."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from cairn.benchmarks.limits import jetstream_publishes, nats_round_trips
from cairn.benchmarks.scale import Scale
from cairn.benchmarks.services import (
    CHAIN,
    IDLE,
    PIPELINE,
    BenchError,
    Progress,
    RunEnds,
    Services,
    bench_workflows,
    rss_mb,
    run_once,
)
from cairn.events import ResultReceived, RunStarted, TaskCompleted, TaskDispatched
from cairn.runtime.client import CairnClient
from cairn.runtime.embedded import EmbeddedNats
from cairn.runtime.eventlog.store import EventStore
from cairn.runtime.settings import Settings


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
