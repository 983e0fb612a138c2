"""Shared fixtures: real nats-server processes, data directories, cairn services as processes."""

from __future__ import annotations

import asyncio
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from cairn.events import EventNotice
from cairn.runtime.client import TERMINAL_TYPES, CairnClient
from cairn.runtime.embedded import EmbeddedNats
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import Supervisor

# One key signs every store the tests write, in this process and in the processes it starts
# (they inherit it), wherever each one looks for its data directory. Tests of where a key is
# found or made take it away (tests/test_tamper.py).
os.environ.setdefault("CAIRN_CHAIN_KEY", secrets.token_hex(32))


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A fresh JetStream server on free ports, its own store: stream names never collide."""
    server = EmbeddedNats(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def settings(tmp_path: Path, nats_server: EmbeddedNats) -> Settings:
    return Settings(home=tmp_path / "home", nats_url=nats_server.url)


@pytest.fixture
def supervisor(settings: Settings) -> Iterator[Supervisor]:
    sup = Supervisor(settings)
    try:
        yield sup
    finally:
        sup.stop_all(timeout=5)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[CairnClient]:
    c = await CairnClient.connect(settings.nats_url, "cairn-test")
    try:
        yield c
    finally:
        await c.close()


async def wait_until(predicate: object, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll a cheap predicate (a callable returning bool) until true; fail after `timeout`."""
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid still exists (reaped children do not)."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def run_to_end(
    client: CairnClient,
    workflow: Any,
    input: dict[str, Any],
    timeout: float = 60,
    **start: Any,
) -> tuple[uuid.UUID, list[EventNotice]]:
    """Start a run (`start`: more `start_run` arguments) and follow its live feed to its end;
    the run's id and every notice, the terminal one last."""
    run_id = uuid.uuid4()
    feed = await client.follow(run_id)
    try:
        reply = await client.start_run(workflow, input, run_id=run_id, **start)
        assert reply.ok, reply.error
        notices: list[EventNotice] = []
        while not notices or notices[-1].type not in TERMINAL_TYPES:
            notices.append(await feed.next(timeout=timeout))
    finally:
        await feed.close()
    return run_id, notices
