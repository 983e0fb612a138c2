"""compose.yaml runs real cairn entry points: start every service's command locally, with the
compose environment pointed at the test NATS server, and run the example workflow through them."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from cairn.coordinator.client import TERMINAL_TYPES, CairnClient
from cairn.coordinator.embedded import EmbeddedNats
from cairn.events import Intent

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def test_compose_declares_every_service() -> None:
    services = compose()["services"]
    assert {"nats", "coordinator", "projections", "planner", "researcher", "writer",
            "reviewer"} <= set(services)  # fmt: skip
    assert "-js" in services["nats"]["command"]
    for name, service in services.items():
        if name == "nats":
            continue
        assert service["environment"]["NATS_URL"] == "nats://nats:4222"
        assert service["command"][:2] == ["python", "-m"]
        assert service["depends_on"]["nats"]["condition"] == "service_healthy"


@pytest.mark.timeout(120)
async def test_compose_commands_run_the_example(tmp_path: Path, nats_server: EmbeddedNats) -> None:
    import sys

    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    data_dir = tmp_path / "data"  # stands in for the shared volume
    try:
        for name, service in compose()["services"].items():
            if name == "nats":
                continue
            env = {**os.environ, **service["environment"]}
            env["NATS_URL"] = nats_server.url
            env["CAIRN_HOME"] = str(data_dir)
            replicas = service.get("deploy", {}).get("replicas", 1)
            argv = [sys.executable, *service["command"][1:]]
            for _ in range(replicas):
                log = (tmp_path / f"{name}.log").open("ab")
                logs.append(log)
                procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=log))
        async with await CairnClient.connect(nats_server.url) as client:
            await client.wait_ready(timeout=30)
            run_id = uuid.uuid4()
            feed = await client.follow(run_id)
            reply = await client.start_run(
                "research-report", {"topic": "rivers"}, intent=Intent(goal="rivers"), run_id=run_id
            )
            assert reply.ok, reply.error
            kinds: list[str] = []
            while not kinds or kinds[-1] not in TERMINAL_TYPES:
                kinds.append((await feed.next(timeout=60)).type)
            await feed.close()
        assert kinds[-1] == "RunCompleted"
        assert all(p.poll() is None for p in procs), "a compose service exited"
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        for log in logs:
            log.close()
