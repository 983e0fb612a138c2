"""The supervisor `cairn up` runs on: a crashed child starts again after a growing pause, each
start with a fresh log; a crash loop, or an exit saying the configuration cannot work, is
given up on; the embedded nats-server is restarted on its port."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from conftest import wait_until

from cairn.runtime.client import CairnClient
from cairn.runtime.restarts import read_restarts
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import (
    NATS_NAME,
    Crashed,
    GaveUpError,
    Restarted,
    RestartPolicy,
    Supervisor,
)

TESTS = str(Path(__file__).parent)
FAST = RestartPolicy(backoff=0.05, limit=3, window=60)


def child_env(**more: str) -> dict[str, str]:
    return {"PYTHONPATH": TESTS, **more}


async def watch_until(
    sup: Supervisor, policy: RestartPolicy, count: int, timeout: float = 20
) -> list[Crashed | Restarted]:
    """What `watch` reports until `count` things happened."""
    seen: list[Crashed | Restarted] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(seen) < count:
        seen.extend(sup.watch(policy))
        assert loop.time() < deadline, seen
        await asyncio.sleep(0.02)
    return seen


async def test_a_killed_child_starts_again_with_a_fresh_log(tmp_path: Path) -> None:
    sup = Supervisor(Settings(home=tmp_path), keep_logs=2, tied=True)
    try:
        first = sup.start("sleeper", "child_process", child_env())
        log = sup.log_path("sleeper")
        await wait_until(lambda: f"child {first.pid} up" in log.read_text(), 20, "the child")
        first.send_signal(signal.SIGKILL)
        crashed, restarted = await watch_until(sup, FAST, 2)
        assert isinstance(crashed, Crashed)
        assert isinstance(restarted, Restarted)
        assert (crashed.name, crashed.pid, crashed.code, crashed.crashes) == (
            "sleeper", first.pid, -signal.SIGKILL, 1,
        )  # fmt: skip
        assert crashed.log == log.with_name("sleeper.log.1")
        assert "was killed by SIGKILL; restarting it in 0.05 s" in crashed.message(FAST)
        second = sup.processes["sleeper"]
        assert restarted.pid == second.pid != first.pid
        await wait_until(lambda: f"child {second.pid} up" in log.read_text(), 20, "the restart")
        # Each start has its own log: this one's says why it started, the last one's is kept.
        current, kept = log.read_text(), crashed.log.read_text()
        assert f"child {first.pid} up" in kept
        assert f"child {first.pid} up" not in current
        assert f"the previous sleeper (pid {first.pid}) was killed by SIGKILL" in current
        assert sup.restarts["sleeper"] == 1
        # Recorded for the dashboard's agents page: how often, and how it ended.
        recorded = read_restarts(tmp_path)["sleeper"]
        assert (recorded["restarts"], recorded["last_ended"]) == (1, "was killed by SIGKILL")
    finally:
        sup.stop_all(timeout=5)
    assert sup.watch(FAST) == []  # asked to stop: nothing is restarted


async def test_a_crash_loop_is_given_up_on(tmp_path: Path) -> None:
    sup = Supervisor(Settings(home=tmp_path), keep_logs=2, tied=True)
    try:
        sup.start("flaky", "child_process", child_env(CHILD_EXIT="1"))
        seen = await watch_until(sup, FAST, 4)
        assert [type(e) for e in seen] == [Crashed, Restarted, Crashed, Restarted]
        crashes = [e for e in seen if isinstance(e, Crashed)]
        assert [c.delay for c in crashes] == [0.05, 0.1]  # doubled each time
        with pytest.raises(GaveUpError) as gave_up:
            await watch_until(sup, FAST, 1)
    finally:
        sup.stop_all(timeout=5)
    message = str(gave_up.value)
    assert message.startswith(
        "the flaky process exited with code 1 for the 3rd time within 60 s (a crash loop), so "
        "every process was stopped; its log ("
    )
    assert message.endswith("exiting with 1")
    # Keep 2: the last start's log and the two before it.
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [
        "flaky.log", "flaky.log.1", "flaky.log.2",
    ]  # fmt: skip


async def test_a_child_that_cannot_run_as_configured_is_not_restarted(tmp_path: Path) -> None:
    sup = Supervisor(Settings(home=tmp_path), keep_logs=2, tied=True)
    try:
        sup.start("misconfigured", "child_process", child_env(CHILD_EXIT="2"))
        with pytest.raises(GaveUpError, match="which says it cannot run as configured"):
            await watch_until(sup, FAST, 1)
    finally:
        sup.stop_all(timeout=5)
    assert sup.restarts["misconfigured"] == 0


async def test_the_embedded_server_is_restarted_on_its_port(tmp_path: Path) -> None:
    sup = Supervisor(Settings(home=tmp_path), keep_logs=2, tied=True)
    try:
        url = sup.ensure_nats()
        assert sup.nats is not None
        assert sup.nats.process is not None
        first = sup.nats.process.pid
        client = await CairnClient.connect(sup.settings.nats_endpoint(), "cairn-test")
        try:
            sup.nats.kill()
            crashed, restarted = await watch_until(sup, FAST, 2)
            assert (crashed.name, crashed.pid, restarted.name) == (NATS_NAME, first, NATS_NAME)
            assert sup.nats.url == url == (tmp_path / "nats.url").read_text()
            await wait_until(lambda: client.nc.is_connected, 20, "the client to reconnect")
        finally:
            await client.close()
    finally:
        sup.stop_all(timeout=5)
    assert not (tmp_path / "nats.url").exists()
