"""Processes started before what they need wait for it: a coordinator and an agent started
before NATS connect once it comes; with a limit, they give up with the sentence they always
said; credentials NATS refuses are not waited for; the projection runner waits for a
PostgreSQL server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import wait_until

from cairn.runtime.client import CairnClient
from cairn.runtime.embedded import EmbeddedNats, free_port
from cairn.runtime.roles import embedded_deployment
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import Supervisor

UNREACHABLE = (
    "cannot reach NATS at {url}: start it (`cairn up` runs an embedded server) or point "
    "NATS_URL at a running server with JetStream enabled"
)


def clean_env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAIRN_", "NATS_"))}
    env["CAIRN_CHAIN_KEY"] = os.environ["CAIRN_CHAIN_KEY"]  # the tests' one key (conftest)
    return env | more


@pytest.mark.timeout(90)
async def test_a_coordinator_and_an_agent_started_before_nats_connect_once_it_comes(
    tmp_path: Path,
) -> None:
    url = f"nats://127.0.0.1:{(port := free_port())}"
    settings = Settings(home=tmp_path / "home", nats_url=url, start_timeout=60)
    sup = Supervisor(settings)
    server: EmbeddedNats | None = None
    try:
        sup.start("coordinator", "cairn.coordinator")
        sup.start("agent-planner", "cairn.agents.examples.planner")
        waiting = f"waiting for NATS at {url}: it does not accept connections yet"
        for name in ("coordinator", "agent-planner"):
            await wait_until(
                lambda name=name: waiting in sup.log_tail(name, 20) or bool(sup.exited()),
                30,
                f"{name} to say it waits",
            )
        assert not sup.exited(), {n: sup.log_tail(n, 20) for n in sup.exited()}
        assert "giving up after 60 s (CAIRN_START_TIMEOUT)" in sup.log_tail("coordinator")

        server = EmbeddedNats(tmp_path / "nats", port=port).start()
        await wait_until(
            lambda: (
                "ready: consumer cairn-agent-planner" in sup.log_tail("agent-planner", 50)
                or bool(sup.exited())
            ),
            30,
            "the agent to bind its consumer",
        )
        assert not sup.exited(), {n: sup.log_tail(n, 20) for n in sup.exited()}
        async with await CairnClient.connect(url, "cairn-test") as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    await client.ping(timeout=1)
                    break
                except Exception:
                    assert not sup.exited(), sup.log_tail("coordinator", 20)
                    assert time.monotonic() < deadline, sup.log_tail("coordinator", 20)
        assert "Traceback" not in sup.log_tail("coordinator", 200)
    finally:
        sup.stop_all(timeout=5)
        if server is not None:
            server.stop()
    assert sup.exited() == {"coordinator": 0, "agent-planner": 0}


@pytest.mark.timeout(60)
def test_they_give_up_after_the_limit_with_the_sentence_they_always_said(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    env = clean_env(NATS_URL=url, CAIRN_HOME=str(tmp_path), CAIRN_START_TIMEOUT="1")
    for module, prefix in (
        ("cairn.coordinator", "cairn coordinator: "),
        ("cairn.agents.examples.writer", "cairn agent writer: "),
    ):
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", module], capture_output=True, text=True, env=env, timeout=30
        )
        assert proc.returncode == 2, proc.stderr
        assert time.monotonic() - started >= 1
        lines = proc.stderr.strip().splitlines()
        assert lines[-1] == prefix + UNREACHABLE.format(url=url)
        assert sum("waiting for NATS at" in line for line in lines) == 1, lines
        assert "giving up after 1 s (CAIRN_START_TIMEOUT)" in proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.timeout(60)
def test_credentials_nats_refuses_are_not_waited_for(tmp_path: Path) -> None:
    auth = embedded_deployment(tmp_path / "auth-home", ["writer"])
    with EmbeddedNats(tmp_path / "nats", config=auth.config) as server:
        env = clean_env(
            NATS_URL=server.url,
            CAIRN_HOME=str(tmp_path),
            CAIRN_START_TIMEOUT="60",
            CAIRN_NATS_USER="agent-writer",
            CAIRN_NATS_PASSWORD="not-the-password",
        )
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "cairn.agents.examples.writer"],
            capture_output=True, text=True, env=env, timeout=30,
        )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - started < 20  # not the 60 s limit
    assert "refused cairn's credentials (authorization violation)" in proc.stderr
    assert "waiting for NATS" not in proc.stderr


@pytest.mark.timeout(60)
def test_the_projection_runner_waits_for_its_database_server(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    port = free_port()
    env = clean_env(
        CAIRN_HOME=str(tmp_path),
        CAIRN_STORE=f"postgresql://postgres@127.0.0.1:{port}/test",
        CAIRN_START_TIMEOUT="1",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "cairn.projections"],
        capture_output=True, text=True, env=env, timeout=45,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert (
        f"waiting for the database server at 127.0.0.1:{port}: it does not accept connections "
        "yet; giving up after 1 s (CAIRN_START_TIMEOUT)"
    ) in proc.stderr
    assert f"cannot open the event store (PostgreSQL at 127.0.0.1:{port}/test)" in proc.stderr
    assert "Traceback" not in proc.stderr
