"""The system under measurement: the bench's workflows, the coordinator and echo agents as
processes against one NATS server and store, runs through them, and what the OS says the
processes cost (RSS, CPU time)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from cairn.benchmarks.logwork import echo_steps
from cairn.events import TASKS_STREAM, agent_consumer
from cairn.runtime.client import CairnClient
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import Supervisor

Progress = Callable[[str], None]

PIPELINE = "bench-pipeline"
CHAIN = "bench-chain"
IDLE = "bench-idle"
ECHO = "echo"
ECHO_MODULE = "cairn.agents.examples.echo"
# Pull loops per agent replica (the worker's default), for knowing when replicas are ready.
AGENT_LOOPS = 4
RUN_TIMEOUT_S = 60.0


class BenchError(RuntimeError):
    """A measurement could not be taken; the message says which and why."""


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
