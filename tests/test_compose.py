"""compose.yaml runs real cairn entry points: start every service's command locally (each
replica a process), with the compose environment pointed at the test NATS server and the running
PostgreSQL, run the example workflow through them, and run each service's health check."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_store_contract import POSTGRES, drop_schema, fresh_schema, require_postgres

from cairn.events import Intent
from cairn.runtime.client import TERMINAL_TYPES, CairnClient
from cairn.runtime.embedded import EmbeddedNats, free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_STORE = "postgresql://cairn:cairn@postgres:5432/cairn"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def cairn_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose()["services"].items()
        if name not in ("nats", "postgres")
    }


def test_compose_declares_every_service() -> None:
    services = compose()["services"]
    assert {"nats", "postgres", "coordinator", "projections", "http", "planner", "researcher",
            "writer", "reviewer"} <= set(services)  # fmt: skip
    assert "-js" in services["nats"]["command"]
    assert services["coordinator"]["deploy"]["replicas"] == 2
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no health check"
    for name, service in cairn_services().items():
        env = service["environment"]
        assert env["NATS_URL"] == "nats://nats:4222"
        assert env["CAIRN_STORE"].startswith(COMPOSE_STORE)
        assert env["CAIRN_VIEWS"].startswith(COMPOSE_STORE)
        assert service["command"][:2] == ["python", "-m"]
        for needed in ("nats", "postgres"):
            assert service["depends_on"][needed]["condition"] == "service_healthy", name


@pytest.fixture
def schemas() -> Iterator[tuple[str, str]]:
    require_postgres()
    names = (fresh_schema(), fresh_schema())
    yield names
    for name in names:
        drop_schema(name)


@pytest.mark.timeout(150)
async def test_compose_commands_run_the_example(
    tmp_path: Path, nats_server: EmbeddedNats, schemas: tuple[str, str]
) -> None:
    store_schema, views_schema = schemas
    http_port = free_port()
    procs: list[tuple[str, subprocess.Popen[bytes], dict[str, str]]] = []
    logs = []
    data_dir = tmp_path / "data"  # stands in for the shared volume
    try:
        for name, service in cairn_services().items():
            replicas = service.get("deploy", {}).get("replicas", 1)
            for replica in range(replicas):
                env = {**os.environ, **service["environment"]}
                # The compose hosts are this machine's test servers; each replica is its own
                # container, so each has its own /tmp.
                env["NATS_URL"] = nats_server.url
                env["CAIRN_HOME"] = str(data_dir)
                env["CAIRN_STORE"] = f"{POSTGRES}?schema={store_schema}"
                env["CAIRN_VIEWS"] = f"{POSTGRES}?schema={views_schema}"
                if "CAIRN_HEALTH_FILE" in env:
                    env["CAIRN_HEALTH_FILE"] = str(tmp_path / f"{name}-{replica}.health")
                if name == "http":
                    env["CAIRN_HTTP_HOST"] = "127.0.0.1"
                    env["CAIRN_HTTP_PORT"] = str(http_port)
                log = (tmp_path / f"{name}-{replica}.log").open("ab")
                logs.append(log)
                argv = [sys.executable, *service["command"][1:]]
                procs.append((name, subprocess.Popen(argv, env=env, stdout=log, stderr=log), env))
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
        dead = [name for name, p, _ in procs if p.poll() is not None]
        assert not dead, f"compose services exited: {dead}"
        # Each service's own health check passes against its process.
        services = compose()["services"]
        for name, _, env in procs:
            check = services[name].get("healthcheck", {}).get("test")
            if not check:
                continue
            argv = [part.replace("127.0.0.1:8700", f"127.0.0.1:{http_port}") for part in check[1:]]
            if argv[0] == "python":
                argv[0] = sys.executable
            if "CAIRN_HEALTH_FILE" in env:
                argv = [a.replace("/tmp/cairn-health", env["CAIRN_HEALTH_FILE"]) for a in argv]
            # As compose runs it: every few seconds until it passes, a bounded number of times
            # (a replica still starting is not healthy yet, nor failed).
            for _ in range(15):
                done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
                if done.returncode == 0:
                    break
                await asyncio.sleep(1)
            assert done.returncode == 0, (name, done.stderr)
    finally:
        for _, p, _ in procs:
            p.terminate()
        for _, p, _ in procs:
            p.wait(10)
        for log in logs:
            log.close()


def test_a_stale_health_file_is_unhealthy(tmp_path: Path) -> None:
    from cairn.runtime.health import Heartbeat, check

    path = tmp_path / "health"
    assert check(path) is not None  # not started
    Heartbeat(str(path)).beat()
    assert check(path) is None
    os.utime(path, (0, 0))
    problem = check(path, max_age_s=15)
    assert problem is not None
    assert "stuck" in problem


# -- what running the services cannot show: images, versions, the specification ---------------

# What each image holds that a health check may call (what was looked at inside them): the
# plain nats image is FROM scratch, its alpine variant has busybox, postgres has its client
# tools, and cairn's own image is python:3.11-slim with cairn installed.
IMAGE_TOOLS = {
    "nats": {"/nats-server"},
    "nats-alpine": {"/nats-server", "nats-server", "wget", "nc", "sh"},
    "postgres": {"pg_isready", "psql", "sh", "bash"},
    "cairn": {"python", "sh", "bash"},
}


def image_kind(service: dict[str, Any]) -> str:
    image = str(service.get("image", ""))
    if image.startswith("cairn:") or "build" in service:
        return "cairn"
    name, _, tag = image.partition(":")
    if name == "nats":
        return "nats-alpine" if tag.endswith("-alpine") else "nats"
    return name


def test_every_health_check_calls_what_its_image_holds() -> None:
    for name, service in compose()["services"].items():
        check = service["healthcheck"]["test"]
        assert check[0] in ("CMD", "CMD-SHELL"), name
        command = check[1].split()[0] if check[0] == "CMD-SHELL" else check[1]
        assert command in IMAGE_TOOLS[image_kind(service)], (name, service.get("image"), command)


def test_compose_runs_the_embedded_servers_nats_version() -> None:
    from cairn.runtime.embedded import nats_server_binary

    out = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True,
                         timeout=30, check=True).stdout  # fmt: skip
    embedded = out.strip().rpartition("v")[2].split(".")[:2]  # "nats-server: v2.15.1"
    tag = compose()["services"]["nats"]["image"].partition(":")[2].removesuffix("-alpine")
    assert tag.split(".")[:2] == embedded, (tag, out)


def test_compose_files_follow_the_compose_specification() -> None:
    import json

    from compose_spec import PyCompose

    # YAML merge keys (`<<: *cairn`), which compose resolves, are resolved by PyYAML first.
    base = compose()
    PyCompose.from_json(json.dumps(base))  # ValueError naming the first key out of the spec
    tracing = yaml.safe_load((ROOT / "compose.tracing.yaml").read_text())
    PyCompose.from_json(json.dumps(tracing))
    assert set(tracing["services"]) - {"jaeger"} <= set(base["services"])
    with pytest.raises(ValueError, match="helthcheck"):
        PyCompose.from_json(json.dumps({"services": {"a": {"image": "x", "helthcheck": {}}}}))


def test_published_ports_are_on_loopback() -> None:
    for path in ("compose.yaml", "compose.tracing.yaml"):
        for name, service in yaml.safe_load((ROOT / path).read_text())["services"].items():
            for port in service.get("ports", []):
                assert str(port).startswith("127.0.0.1:"), (path, name, port)


def test_the_image_holds_every_package() -> None:
    import tomllib

    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                  ["package-dir"].values())  # fmt: skip
    copied = {
        line.split()[1]
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ") and not line.startswith("COPY pyproject")
    }
    assert folders <= copied, folders - copied
