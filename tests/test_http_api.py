"""The HTTP API against real processes: nats-server, coordinator, projections, agents, and the
server itself (`python -m cairn.projections.http`), called over HTTP with bearer tokens."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import wait_until

from cairn.events import ApprovalGranted, Budget, EventNotice, Intent
from cairn.projections import wait_for_views
from cairn.projections.http import Tokens, create_app, url_file
from cairn.runtime.client import TERMINAL_TYPES, CairnClient, EventFeed
from cairn.runtime.eventlog.store import EventStore
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import Supervisor

pytestmark = pytest.mark.timeout(90)

ADMIN = "admin-token-0123456789abcdef"
APPROVER = "approver-token-0123456789abcdef"
VIEWER = "viewer-token-0123456789abcdef"
TOKENS = {
    ADMIN: {"subject": "ada", "role": "admin"},
    APPROVER: {"subject": "maria", "role": "approver"},
    VIEWER: {"subject": "victor", "role": "viewer"},
}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def start_api(supervisor: Supervisor, client: CairnClient, settings: Settings) -> str:
    """Every service, the HTTP server on a free port; its base URL once it listens."""
    supervisor.start_all()
    supervisor.start(
        "http",
        "cairn.projections.http",
        {"CAIRN_API_TOKENS": json.dumps(TOKENS), "CAIRN_HTTP_PORT": "0"},
    )
    await client.wait_ready()
    path = url_file(settings)
    await wait_until(path.exists, 20, "the HTTP server to listen")
    return path.read_text().strip()


@contextlib.asynccontextmanager
async def api_client(base: str, token: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    headers = bearer(token) if token else {}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=20) as http:
        yield http


async def next_of(feed: EventFeed, kinds: set[str], timeout: float = 30) -> EventNotice:
    while True:
        notice = await feed.next(timeout=timeout)
        if notice.type in kinds or notice.type in TERMINAL_TYPES:
            return notice


async def gated_run(client: CairnClient, topic: str) -> tuple[uuid.UUID, EventFeed, EventNotice]:
    """A `reviewed-report` run stopped at its gate before `write`."""
    run_id = uuid.uuid4()
    feed = await client.follow(run_id)
    reply = await client.start_run(
        "reviewed-report", {"topic": topic}, intent=Intent(goal=topic), run_id=run_id
    )
    assert reply.ok, reply.error
    gate = await next_of(feed, {"ApprovalRequested"})
    assert gate.type == "ApprovalRequested", gate
    return run_id, feed, gate


async def sse_notices(base: str, run_id: uuid.UUID, into: list[dict[str, Any]]) -> None:
    """Read the run's server-sent events into `into` until its terminal event."""
    async with (
        api_client(base, VIEWER) as http,
        http.stream("GET", "/api/events", params={"run": str(run_id)}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                into.append(json.loads(line.removeprefix("data: ")))
                if into[-1]["type"] in TERMINAL_TYPES:
                    return
            elif line == ": subscribed":
                into.append({"type": "subscribed"})


# -- without the services: auth, validation, what is down ---------------------------------------


def test_auth_validation_and_unreachable_services_answer_json_errors(
    settings: Settings, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    tokens = Tokens.from_mapping(TOKENS, "test tokens")
    run = str(uuid.uuid4())
    with TestClient(create_app(settings, tokens)) as http:
        # No token, a wrong one, a malformed header: 401 with a JSON error saying what to send.
        for headers in ({}, bearer("not-a-configured-token-at-all"), {"Authorization": "Basic x"}):
            reply = http.get("/api/runs", headers=headers)
            assert reply.status_code == 401, headers
            assert set(reply.json()) == {"error"}
            assert reply.headers["www-authenticate"].startswith("Bearer")
        assert "Bearer TOKEN" in http.get("/api/approvals").json()["error"]

        # Roles: a viewer may not approve, an approver may not cancel or raise budgets.
        decide = {"step": "write", "reason": "ok"}
        reply = http.post(f"/api/runs/{run}/approve", json=decide, headers=bearer(VIEWER))
        assert reply.status_code == 403
        assert reply.json() == {
            "error": "victor has the viewer role: this needs approver or higher"
        }
        assert (
            http.post(f"/api/runs/{run}/deny", json=decide, headers=bearer(VIEWER)).status_code
            == 403
        )
        assert http.post(f"/api/runs/{run}/cancel", headers=bearer(APPROVER)).status_code == 403
        budget = {"usd": "1.00"}
        assert (
            http.post(f"/api/runs/{run}/budget", json=budget, headers=bearer(APPROVER)).status_code
            == 403
        )

        # Input is validated: the approver is never a field the client chooses.
        reply = http.post(
            f"/api/runs/{run}/approve",
            json={**decide, "by": "mallory"},
            headers=bearer(APPROVER),
        )
        assert reply.status_code == 422
        assert "by: Extra inputs are not permitted" in reply.json()["error"]
        reply = http.post(f"/api/runs/{run}/budget", json={}, headers=bearer(ADMIN))
        assert reply.status_code == 422
        assert "give usd, tokens or both" in reply.json()["error"]
        reply = http.post(f"/api/runs/{run}/budget", json={"usd": "-1"}, headers=bearer(ADMIN))
        assert reply.status_code == 422
        assert http.get("/api/runs?limit=0", headers=bearer(VIEWER)).status_code == 422
        assert http.get("/api/costs?by=day", headers=bearer(VIEWER)).status_code == 422
        assert (
            http.get("/api/nowhere", headers=bearer(VIEWER))
            .json()["error"]
            .startswith("no such path")
        )

        # The login cookie works for reads; a command with it must be JSON (no cross-site form).
        http.cookies.set("cairn_token", APPROVER)
        assert http.get("/api/runs").status_code == 503  # authenticated; the views are missing
        reply = http.post(f"/api/runs/{run}/approve", data={"step": "write"})
        assert reply.status_code == 403
        assert "Content-Type application/json" in reply.json()["error"]
        http.cookies.clear()

        # What is not running is named, with how to start it.
        reply = http.get("/api/runs", headers=bearer(VIEWER))
        assert reply.status_code == 503
        assert "no views yet" in reply.json()["error"]
        reply = http.get("/api/approvals", headers=bearer(VIEWER))
        assert reply.status_code == 503
        assert reply.json()["error"].startswith("no coordinator answered on NATS")
        assert "cairn up" in reply.json()["error"]
        reply = http.post(f"/api/runs/{run}/approve", json=decide, headers=bearer(APPROVER))
        assert reply.status_code == 503

        spec = http.get("/openapi.json").json()
        paths = {"/api/runs", "/api/runs/{run}", "/api/costs", "/api/audit", "/api/approvals",
                 "/api/agents", "/api/events", "/api/runs/{run}/approve", "/api/runs/{run}/deny",
                 "/api/runs/{run}/cancel", "/api/runs/{run}/budget",
                 "/api/dead-letters"}  # fmt: skip
        assert paths <= set(spec["paths"])
        assert http.get("/docs").status_code == 200

    closed = Settings(home=tmp_path / "other", nats_url="nats://127.0.0.1:1")
    with TestClient(create_app(closed, tokens)) as http:
        reply = http.get("/api/agents", headers=bearer(VIEWER))
        assert reply.status_code == 503
        assert reply.json()["error"].startswith("cannot reach NATS at nats://127.0.0.1:1")
        reply = http.get("/api/dead-letters", headers=bearer(VIEWER))
        assert reply.status_code == 503
        assert reply.json()["error"].startswith("cannot reach NATS at nats://127.0.0.1:1")
        page = http.get("/agents", headers=bearer(VIEWER))
        assert page.status_code == 200
        assert page.text.count("cannot reach NATS at nats://127.0.0.1:1") == 2  # both sections


# -- with every service running ------------------------------------------------------------------


async def test_gated_run_approved_over_http_records_the_tokens_subject(
    settings: Settings, supervisor: Supervisor, client: CairnClient
) -> None:
    base = await start_api(supervisor, client, settings)
    plain = uuid.uuid4()
    done = await client.follow(plain)
    assert (await client.start_run("research-report", {"topic": "moss"}, run_id=plain)).ok
    assert (await next_of(done, set())).type == "RunCompleted"
    await done.close()

    run_id, feed, _ = await gated_run(client, "bees")
    notices: list[dict[str, Any]] = []
    sse = asyncio.create_task(sse_notices(base, run_id, notices))
    await wait_until(lambda: bool(notices), 10, "the event stream to open")

    async with api_client(base, APPROVER) as http:
        pending = (await http.get("/api/approvals")).json()
        assert [(a["run_id"], a["step"], a["group"]) for a in pending] == [
            (str(run_id), "write", "editors")
        ]
        reply = await http.post(
            f"/api/runs/{str(run_id)[:8]}/approve", json={"step": "write"}, headers=bearer(VIEWER)
        )
        assert reply.status_code == 403
        reply = await http.post(
            f"/api/runs/{run_id}/approve", json={"step": "write", "reason": "facts ok"}
        )
        assert reply.status_code == 200, reply.text
        assert reply.json() == {
            "ok": True,
            "run_id": str(run_id),
            "status": "running",
            "by": "maria",
        }
        again = await http.post(f"/api/runs/{run_id}/approve", json={"step": "write"})
        assert again.status_code == 409
        assert again.json() == {
            "error": "the approval request for write was already granted by maria"
        }

    await asyncio.wait_for(sse, 30)
    end = await next_of(feed, set())
    await feed.close()
    assert end.type == "RunCompleted"
    streamed = [n["type"] for n in notices if n["type"] != "subscribed"]
    assert streamed[0] == "ApprovalGranted"  # the stream opened after the gate
    assert streamed[-1] == "RunCompleted"
    assert [n["position"] for n in notices[1:]] == sorted(n["position"] for n in notices[1:])

    store = EventStore(settings.store)
    granted = [e for e in store.load(run_id) if isinstance(e, ApprovalGranted)]
    store.close()
    assert [(g.actor, g.by, g.reason) for g in granted] == [("human:maria", "maria", "facts ok")]

    async with api_client(base, VIEWER) as http:
        # `position` waits for the views to include the event the client was told about.
        detail = (
            await http.get(f"/api/runs/{str(run_id)[:8]}", params={"position": end.position})
        ).json()
        assert detail["run"]["status"] == "completed"
        assert detail["position"] >= end.position
        assert [s["step"] for s in detail["steps"]] == ["plan", "research", "write", "review"]
        assert set(detail["outputs"]) == {"plan", "research", "write", "review"}
        assert detail["outputs"]["write"] == detail["run"]["output"]["report"]
        assert detail["approvals"] == []
        assert detail["budget"] is None
        actions = [t["action"] for t in detail["timeline"]]
        assert actions[0] == "RunStarted"
        assert actions[-1] == "RunCompleted"
        assert {"ApprovalRequested", "ApprovalGranted"} <= set(actions)

        missing = await http.get(f"/api/runs/{uuid.uuid4()}")
        assert missing.status_code == 404
        assert (await http.get("/api/runs/zz")).status_code == 404

        # Runs: filters and paging, newest first.
        page = (await http.get("/api/runs", params={"limit": 1})).json()
        assert [r["run_id"] for r in page["runs"]] == [str(run_id)]
        assert page["more"]
        page = (await http.get("/api/runs", params={"limit": 1, "offset": 1})).json()
        assert [r["run_id"] for r in page["runs"]] == [str(plain)]
        assert not page["more"]
        page = (await http.get("/api/runs", params={"workflow": "research-report"})).json()
        assert [r["run_id"] for r in page["runs"]] == [str(plain)]
        page = (await http.get("/api/runs", params={"status": "running"})).json()
        assert page["runs"] == []
        assert (await http.get("/api/runs", params={"status": "bogus"})).status_code == 422

        # Costs: grouped, exact, and per day (all of it today).
        costs = (await http.get("/api/costs", params={"by": "model"})).json()
        total = Decimal(costs["total"])
        assert total > 0
        assert sum(Decimal(r["amount_usd"]) for r in costs["rows"]) == total
        assert sum(Decimal(d["amount_usd"]) for d in costs["by_day"]) == total
        assert sum(d["charges"] for d in costs["by_day"]) == sum(
            r["charges"] for r in costs["rows"]
        )
        by_agent = (await http.get("/api/costs", params={"by": "agent", "run": str(run_id)})).json()
        assert {r["key"] for r in by_agent["rows"]} == {
            "planner",
            "researcher",
            "writer",
            "reviewer",
        }

        # Audit: filters by run, type, actor and time.
        rows = (
            await http.get("/api/audit", params={"run": str(run_id), "type": "ApprovalGranted"})
        ).json()
        assert [(r["actor"], r["reason"]) for r in rows] == [("human:maria", "facts ok")]
        rows = (await http.get("/api/audit", params={"actor": "human:", "limit": 0})).json()
        assert [r["action"] for r in rows] == ["ApprovalGranted"]
        day = detail["run"]["started_at"][:10]
        rows = (
            await http.get("/api/audit", params={"since": day, "until": day, "limit": 0})
        ).json()
        assert len(rows) == len(actions) + len(
            (await http.get("/api/audit", params={"run": str(plain), "limit": 0})).json()
        )
        assert (await http.get("/api/audit", params={"type": "Nope"})).status_code == 422
        assert (await http.get("/api/audit", params={"since": "yesterday"})).status_code == 422

        # Agents: one consumer per capability, with replicas pulling.
        async def capabilities() -> dict[str, Any]:
            reply = (await http.get("/api/agents")).json()
            return {a["capability"]: a for a in reply["agents"]}

        agents = await capabilities()
        assert set(agents) == {"planner", "researcher", "writer", "reviewer"}
        assert all(a["consumer"] == f"cairn-agent-{c}" for c, a in agents.items())
        assert agents["writer"]["last_delivered_at"] is not None
        assert all(a["queued"] == 0 for a in agents.values())


async def test_deny_cancel_and_budget_are_sent_as_the_token_subject(
    settings: Settings, supervisor: Supervisor, client: CairnClient
) -> None:
    base = await start_api(supervisor, client, settings)
    denied, denied_feed, _ = await gated_run(client, "wasps")
    cancelled, cancelled_feed, _ = await gated_run(client, "hornets")

    poor = uuid.uuid4()
    poor_feed = await client.follow(poor)
    reply = await client.start_run(
        "research-report", {"topic": "owls"}, run_id=poor, budget=Budget(usd=Decimal("0.0105"))
    )
    assert reply.ok
    assert (await next_of(poor_feed, {"BudgetExhausted"})).type == "BudgetExhausted"

    async with api_client(base, APPROVER) as http:
        reply = await http.post(
            f"/api/runs/{denied}/deny", json={"step": "write", "reason": "off topic"}
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["by"] == "maria"
    async with api_client(base, ADMIN) as http:
        reply = await http.post(f"/api/runs/{cancelled}/cancel", json={"reason": "not needed"})
        assert reply.status_code == 200, reply.text
        assert reply.json()["status"] == "cancelled"
        again = await http.post(f"/api/runs/{cancelled}/cancel")
        assert again.status_code == 409
        assert "already" in again.json()["error"]
        reply = await http.post(f"/api/runs/{poor}/budget", json={"usd": "1", "reason": "worth it"})
        assert reply.status_code == 200, reply.text
        unknown = await http.post(f"/api/runs/{uuid.uuid4()}/cancel")
        assert unknown.status_code == 409

    ends = {}
    for run_id, feed in ((denied, denied_feed), (cancelled, cancelled_feed), (poor, poor_feed)):
        ends[run_id] = await next_of(feed, set())
        await feed.close()
    assert ends[denied].type == "RunFailed"
    assert ends[cancelled].type == "RunCancelled"
    assert ends[poor].type == "RunCompleted"

    store = EventStore(settings.store)
    actors = {
        run_id: {e.type_name(): (e.actor, e.reason) for e in store.load(run_id)}
        for run_id in (denied, cancelled, poor)
    }
    store.close()
    assert actors[denied]["ApprovalDenied"] == ("human:maria", "off topic")
    assert actors[cancelled]["RunCancelled"] == ("human:ada", "not needed")
    assert actors[poor]["BudgetRaised"] == ("human:ada", "worth it")

    last = max(e.position for e in ends.values())
    await asyncio.to_thread(wait_for_views, settings.views, last, 15.0)
    async with api_client(base, VIEWER) as http:
        detail = (await http.get(f"/api/runs/{poor}")).json()
        assert detail["budget"]["usd"] == "1"
        assert Decimal(detail["budget"]["spent_usd"]) == Decimal(detail["run"]["cost_usd"])
        assert Decimal(detail["budget"]["remaining_usd"]) == 1 - Decimal(detail["run"]["cost_usd"])
        statuses = {r["run_id"]: r["status"] for r in (await http.get("/api/runs")).json()["runs"]}
        assert statuses == {
            str(denied): "failed",
            str(cancelled): "cancelled",
            str(poor): "completed",
        }


def test_tokens_come_from_the_first_configured_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cairn.projections.http import Role, TokenConfigError, load_tokens

    monkeypatch.delenv("CAIRN_API_TOKENS", raising=False)
    monkeypatch.delenv("CAIRN_API_TOKENS_FILE", raising=False)
    home = tmp_path / "home"
    # Nothing configured: a token file is made under the home, owner-only, with one admin.
    made = load_tokens(home)
    path = home / "api-tokens.yaml"
    assert path.stat().st_mode & 0o777 == 0o600
    assert made.source == f"the token file {path}"
    assert [g.role for g in made.grants.values()] == [Role.admin]
    assert load_tokens(home).grants == made.grants  # kept, not made again

    monkeypatch.setenv("CAIRN_API_TOKENS", json.dumps(TOKENS))
    from_env = load_tokens(home)
    grant = from_env.lookup(APPROVER)
    assert grant is not None
    assert (grant.subject, grant.role) == ("maria", Role.approver)
    assert from_env.lookup(APPROVER[:-1]) is None

    file = tmp_path / "tokens.yaml"
    file.write_text(f"{VIEWER}: {{subject: victor, role: viewer}}\n")
    assert load_tokens(home, file).lookup(VIEWER) is not None  # --tokens wins
    for text, message in (
        ("short: {subject: x, role: admin}", "at least 16 characters"),
        (f"{VIEWER}: {{subject: x, role: boss}}", "role 'boss' of 'x' is not one of"),
        (f"{VIEWER}: {{role: admin}}", "subject is invalid"),
        ("[1, 2]", "must map each token"),
        (f"{VIEWER}: [", "not valid YAML or JSON"),
    ):
        file.write_text(text)
        with pytest.raises(TokenConfigError, match=message):
            load_tokens(home, file)
    with pytest.raises(TokenConfigError, match="cannot read the token file"):
        load_tokens(home, tmp_path / "missing.yaml")


# -- before the body is read: the token, the size, where a login comes from ----------------------


@pytest.fixture
def live_api(settings: Settings) -> Iterator[tuple[str, int]]:
    """The API served as its own process on a real socket, with a small body limit."""
    import os
    import subprocess
    import sys

    env = {**os.environ, **settings.env(), "CAIRN_API_TOKENS": json.dumps(TOKENS)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cairn.projections.http", "--host", "127.0.0.1", "--port", "0",
         "--max-body", "4096"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not url_file(settings).exists():
            assert proc.poll() is None, "the API process exited"
            assert time.monotonic() < deadline, "the API did not start listening in 30 s"
            time.sleep(0.02)
        port = int(url_file(settings).read_text().strip().rpartition(":")[2])
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        proc.wait(10)


def raw_request(address: tuple[str, int], head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send a request's head (and what of its body is given), return the status and reply
    body the server sends back within a few seconds, before the rest of any body."""
    import socket

    with socket.create_connection(address, timeout=5) as conn:
        conn.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < int(
            dict(
                line.split(": ", 1)
                for line in reply.partition(b"\r\n\r\n")[0].decode().split("\r\n")[1:]
                if ": " in line
            ).get("content-length", "0")
        ):
            chunk = conn.recv(65536)
            if not chunk:
                break
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    return status, reply.partition(b"\r\n\r\n")[2]


def test_a_huge_body_without_a_token_is_refused_before_it_is_read(
    live_api: tuple[str, int],
) -> None:
    # 400 MB announced, 16 bytes sent: the answer comes at once, nothing waits for the rest.
    head = (
        f"POST /api/runs/{uuid.uuid4()}/cancel HTTP/1.1\nHost: 127.0.0.1\n"
        "Content-Type: application/json\nContent-Length: 400000000\n"
    )
    started = time.monotonic()
    status, body = raw_request(live_api, head, b'{"reason": "x", ')
    assert status == 401
    assert "Bearer TOKEN" in json.loads(body)["error"]
    assert time.monotonic() - started < 5
    # A wrong token is no better than none.
    status, _ = raw_request(
        live_api, head.replace("Host:", f"Authorization: Bearer {'x' * 20}\nHost:")
    )
    assert status == 401


def test_a_body_over_the_limit_gets_413_with_or_without_its_length(
    live_api: tuple[str, int],
) -> None:
    auth = f"Authorization: Bearer {ADMIN}\nHost: 127.0.0.1\nContent-Type: application/json\n"
    path = f"/api/runs/{uuid.uuid4()}/cancel"
    status, body = raw_request(live_api, f"POST {path} HTTP/1.1\n{auth}Content-Length: 400000000\n")
    assert status == 413
    assert "over this server's 4096-byte limit" in json.loads(body)["error"]
    # Chunked, with no length to go by: counted as it arrives.
    chunk = b"x" * 3000
    chunked = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 3 + b"0\r\n\r\n"
    status, body = raw_request(
        live_api, f"POST {path} HTTP/1.1\n{auth}Transfer-Encoding: chunked\n", chunked
    )
    assert status == 413
    assert "at least" in json.loads(body)["error"]
    # Within the limit, the request goes on to the app (here: NATS is not there, 503).
    small = b'{"reason": "why not"}'
    status, _ = raw_request(
        live_api, f"POST {path} HTTP/1.1\n{auth}Content-Length: {len(small)}\n", small
    )
    assert status not in (401, 413)


def test_login_is_refused_from_another_site(live_api: tuple[str, int]) -> None:
    form = f"token={ADMIN}&next=/runs".encode()
    base = (
        "POST /login HTTP/1.1\nHost: 127.0.0.1:{port}\n"
        "Content-Type: application/x-www-form-urlencoded\n"
        f"Content-Length: {len(form)}\n"
    ).replace("{port}", str(live_api[1]))
    for header in (
        "Origin: https://evil.example\n",
        "Origin: null\n",
        "Sec-Fetch-Site: cross-site\n",
        "Referer: https://evil.example/x\n",
    ):
        status, body = raw_request(live_api, base + header, form)
        assert status == 403, header
        assert "posted from this site" in json.loads(body)["error"]
    for header in (
        f"Origin: http://127.0.0.1:{live_api[1]}\n",
        "Sec-Fetch-Site: same-origin\n",
        "",
    ):
        status, _ = raw_request(live_api, base + header, form)
        assert status == 303, header


def test_the_agents_view_counts_each_capabilitys_restarts() -> None:
    from datetime import UTC, datetime

    from cairn.projections.http.agents import agents_reply
    from cairn.runtime.capabilities import CapabilityConsumer

    def consumer(capability: str) -> CapabilityConsumer:
        return CapabilityConsumer(capability, f"cairn-agent-{capability}", 1, 0, 0, 0, None, None)

    restarts = {
        "agent-researcher": {"restarts": 2, "last_ended": "was killed by SIGKILL", "last_at": "t"},
        "agent-researcher-2": {"restarts": 1, "last_ended": "exited with status 1", "last_at": "t"},
        "agent-researcher-x": {"restarts": 5, "last_ended": "?", "last_at": "t"},  # not a replica
        "coordinator": {"restarts": 1, "last_ended": "was killed by SIGKILL", "last_at": "t"},
    }
    reply = agents_reply(
        [consumer("researcher"), consumer("writer")], 4, datetime.now(UTC), restarts
    )
    assert {a.capability: a.restarts for a in reply.agents} == {"researcher": 3, "writer": 0}
    assert [(r.name, r.restarts) for r in reply.restarts] == [
        ("agent-researcher", 2), ("agent-researcher-2", 1), ("agent-researcher-x", 5),
        ("coordinator", 1),
    ]  # fmt: skip
