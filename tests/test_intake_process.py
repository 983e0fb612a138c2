"""What a run is started with, against real processes (issue parts 5–7 and 11): nats-server, a
coordinator, the projection runner and the HTTP server, with `cairn` commands run as processes.

Bad input creates no run (the start command, `cairn run`, the HTTP API), with the field and the
reason in the error; a capability no live agent serves is warned about and the run starts; a
workflow file added while the coordinator runs can be started, a broken one is named and the
others start; `cairn cancel` takes an id prefix; `cairn runs --status` names the statuses; a
token added to the token file works without a restart. One system serves the module.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import yaml

from cairn.events import (
    CMD_START,
    CapabilityUnserved,
    CommandReply,
    DeadLetter,
    Event,
    RunCancelled,
    RunStarted,
    dlq_subject,
    result_subject,
)
from cairn.projections import wait_for_views
from cairn.projections.http import url_file
from cairn.runtime.capabilities import capability_consumers
from cairn.runtime.client import CairnClient
from cairn.runtime.deadletters import DeadLetterReport
from cairn.runtime.embedded import EmbeddedNats
from cairn.runtime.eventlog.store import EventStore
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import Supervisor

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(90)]

ADMIN = "intake-admin-token-0123456789"
LATE = "intake-late-token-0123456789ab"
ONE_STEP = "name: {name}\nsteps:\n  - name: {step}\n    capability: {capability}\n"


@dataclass
class System:
    settings: Settings
    supervisor: Supervisor
    client: CairnClient
    store: EventStore
    base: str  # the HTTP server's address
    tokens: Path

    @property
    def workflows(self) -> Path:
        return self.settings.home / "workflows"

    def events(self, run_id: uuid.UUID) -> list[Event]:
        return self.store.load(run_id)

    def started(self) -> set[uuid.UUID]:
        """Every run in the store."""
        found: set[uuid.UUID] = set()
        position = 0
        while batch := self.store.read_log(position, limit=5000):
            found.update(i.event.run_id for i in batch if isinstance(i.event, RunStarted))
            position = batch[-1].position
        return found

    def cli(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.settings.env(), "COLUMNS": "200"}
        return subprocess.run(
            [sys.executable, "-m", "cairn.cli", *args],
            capture_output=True, text=True, env=env, timeout=60, cwd=cwd,
        )  # fmt: skip

    def http(self, token: str = ADMIN) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.AsyncClient(base_url=self.base, headers=headers, timeout=20)

    def assert_alive(self) -> None:
        exited = self.supervisor.exited()
        assert not exited, (exited, self.supervisor.log_tail("coordinator", 30))


async def poll(check: Any, timeout: float = 15.0, what: str = "condition") -> Any:
    """Await `check()` until it returns something truthy; fail after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (found := await check()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
    return found


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def system(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    root = tmp_path_factory.mktemp("intake")
    home = root / "home"
    (home / "workflows").mkdir(parents=True)
    # Before the coordinator starts: one broken file must not stop it, nor hide the others.
    (home / "workflows" / "broken.yaml").write_text("name: broken\nsteps: [\n")
    (home / "workflows" / "solo.yaml").write_text(
        ONE_STEP.format(name="solo", step="say", capability="echo")
    )
    tokens = root / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({ADMIN: {"subject": "ada", "role": "admin"}}))
    with EmbeddedNats(root / "nats") as server:
        settings = Settings(home=home, nats_url=server.url)
        supervisor = Supervisor(settings)
        client: CairnClient | None = None
        store: EventStore | None = None
        try:
            supervisor.start("coordinator", "cairn.coordinator")
            supervisor.start("projections", "cairn.projections")
            supervisor.start(
                "http",
                "cairn.projections.http",
                {"CAIRN_API_TOKENS_FILE": str(tokens), "CAIRN_HTTP_PORT": "0"},
            )
            client = await CairnClient.connect(server.url, "cairn-intake")
            await client.wait_ready(timeout=30)
            await poll(lambda: asyncio.to_thread(url_file(settings).exists), 20, "the HTTP server")
            base = url_file(settings).read_text().strip()
            store = EventStore(settings.store)
            yield System(settings, supervisor, client, store, base, tokens)
        finally:
            if client is not None:
                await client.close()
            supervisor.stop_all(timeout=5)
            if store is not None:
                store.close()


# -- input checked at the door --------------------------------------------------------------


async def test_a_start_command_with_bad_input_is_refused_and_creates_no_run(
    system: System,
) -> None:
    run_id = uuid.uuid4()
    command = {"v": 1, "run_id": str(run_id), "workflow": "research-report", "input": {}}
    msg = await system.client.nc.request(CMD_START, json.dumps(command).encode(), timeout=5)
    reply = CommandReply.model_validate_json(msg.data)
    assert not reply.ok
    assert reply.error == (
        "the input does not fit the input schema of workflow 'research-report' "
        "(ReportInput@1): input.topic: Field required; correct the input and start the run again"
    )
    assert system.events(run_id) == []

    # The same run id with good input starts: nothing was kept of the refusal.
    reply = await system.client.start_run("research-report", {"topic": "tides"}, run_id=run_id)
    assert reply.ok, reply.error
    assert isinstance(system.events(run_id)[0], RunStarted)


async def test_without_a_schema_a_missing_input_reference_is_refused(system: System) -> None:
    (system.workflows / "refers.yaml").write_text(
        "name: refers\nsteps:\n  - name: a\n    capability: echo\n"
        "    input:\n      topic: $input.topic\n      tone: $input.tone ?? plain\n"
    )
    run_id = uuid.uuid4()
    reply = await system.client.start_run("refers", {"tone": "dry"}, run_id=run_id)
    assert reply.error == (
        "the input lacks what workflow 'refers' refers to: input.topic: missing (step 'a' refers "
        "to $input.topic); give those fields (or a `?? default` on the reference in the workflow)"
    )
    assert system.events(run_id) == []
    assert (await system.client.start_run("refers", {"topic": "t"})).ok


async def test_cairn_run_with_bad_input_says_why_on_stderr_and_starts_nothing(
    system: System,
) -> None:
    before = system.started()
    for args in ((), ("--input", "{}"), ("--input", '{"topc": "tides"}', "--wait")):
        proc = await asyncio.to_thread(system.cli, "run", "research-report", *args)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "started run" not in proc.stdout
        assert "input.topic: Field required" in proc.stderr, proc.stderr
    assert "input.topc: Extra inputs are not permitted" in proc.stderr
    assert system.started() == before


async def test_the_api_refuses_bad_input_with_422_and_creates_no_run(system: System) -> None:
    before = system.started()
    async with system.http() as http:
        reply = await http.post("/api/runs", json={"workflow": "research-report", "input": {}})
        assert reply.status_code == 422, reply.text
        assert "input.topic: Field required" in reply.json()["error"]
        reply = await http.post("/api/runs", json={"workflow": "no-such", "input": {}})
        assert reply.status_code == 422
        assert reply.json()["error"].startswith("unknown workflow 'no-such'")
    assert system.started() == before


# -- capabilities nobody serves -------------------------------------------------------------


async def test_a_capability_no_live_agent_serves_is_warned_about_and_the_run_starts(
    system: System, tmp_path: Path
) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text(ONE_STEP.format(name="typo", step="plan", capability="planer"))
    proc = await asyncio.to_thread(system.cli, "run", str(typo), "--input", "{}")
    assert proc.returncode == 0, proc.stderr
    assert "warning: no live agent serves 'planer' (step plan)" in " ".join(proc.stderr.split())
    run_id = uuid.UUID(proc.stdout.split("started run ")[1].split()[0])
    assert isinstance(system.events(run_id)[0], RunStarted)

    # The run's record says so too, once, a few seconds after the task was sent.
    async def recorded() -> list[CapabilityUnserved]:
        return [e for e in system.events(run_id) if isinstance(e, CapabilityUnserved)]

    (waiting,) = await poll(recorded, 20, "the run to record that it waits for planer")
    assert (waiting.step, waiting.attempt, waiting.capability) == ("plan", 1, "planer")
    assert waiting.reason.startswith("no live agent serves 'planer'")

    # The API says the same (here of a workflow file written while the coordinator runs).
    (system.workflows / "typo.yaml").write_text(typo.read_text())
    async with system.http() as http:
        reply = await http.post("/api/runs", json={"workflow": "typo"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["unserved"] == {"planer": ["plan"]}
    assert body["warning"].startswith("no live agent serves 'planer' (step plan)")
    assert body["by"] == "ada"
    events = system.events(uuid.UUID(body["run_id"]))
    assert isinstance(events[0], RunStarted)
    assert events[0].actor == "human:ada"


async def test_a_served_capability_gets_no_warning(system: System) -> None:
    system.supervisor.start("agent-echo", "cairn.agents.examples.echo")
    js = system.client.nc.jetstream()

    async def echo_pulls() -> bool:
        consumers = await capability_consumers(js)
        return any(c.capability == "echo" and c.waiting_pulls for c in consumers)

    await poll(echo_pulls, 30, "the echo agent to pull")

    async def started_without_warning() -> bool:
        reply = await system.client.start_run("solo", {})
        assert reply.ok, reply.error
        return reply.data is None

    # The coordinator looks at the consumers at most once a second.
    await poll(started_without_warning, 10, "a start without a warning")


# -- the workflow catalog -------------------------------------------------------------------


async def test_a_broken_workflow_file_is_named_and_the_others_start(system: System) -> None:
    system.assert_alive()
    broken = system.workflows / "broken.yaml"
    reply = await system.client.start_run("broken", {})
    assert not reply.ok
    assert reply.error is not None
    assert reply.error.startswith(f"workflow 'broken' is not loaded: {broken} is not valid YAML")
    log = (system.settings.home / "logs" / "coordinator.log").read_text()
    assert f"workflow file {broken} is not loaded" in log
    assert (await system.client.start_run("solo", {})).ok
    reply = await system.client.start_run("nope", {})
    assert reply.error is not None
    assert "not loaded, see the coordinator's log: broken.yaml" in reply.error


async def test_a_workflow_file_added_while_the_coordinator_runs_can_be_started(
    system: System,
) -> None:
    (system.workflows / "late.yml").write_text(
        ONE_STEP.format(name="late", step="s", capability="echo")
    )
    reply = await system.client.start_run("late", {})
    assert reply.ok, reply.error
    proc = await asyncio.to_thread(system.cli, "run", "late", "--input", "{}")
    assert proc.returncode == 0, proc.stderr
    system.assert_alive()


# -- the smaller points ---------------------------------------------------------------------


async def test_cancel_takes_a_unique_id_prefix(system: System) -> None:
    (system.workflows / "idle.yaml").write_text(
        ONE_STEP.format(name="idle", step="wait", capability="nobody")
    )
    run_id = uuid.uuid4()
    reply = await system.client.start_run("idle", {}, run_id=run_id)
    assert reply.ok, reply.error
    position = system.store.last_position()
    await asyncio.to_thread(wait_for_views, system.settings, position, 20)

    prefix = str(run_id)[:8]
    proc = await asyncio.to_thread(system.cli, "cancel", prefix, "--reason", "by prefix")
    assert proc.returncode == 0, proc.stderr
    assert f"run {run_id} cancelled" in proc.stdout
    assert isinstance(system.events(run_id)[-1], RunCancelled)

    proc = await asyncio.to_thread(system.cli, "cancel", "zzzz")
    assert proc.returncode == 2
    assert "zzzz" in proc.stderr


async def test_runs_with_an_unknown_status_names_the_statuses(system: System) -> None:
    proc = await asyncio.to_thread(system.cli, "runs", "--status", "runing")
    assert proc.returncode == 2
    assert (
        "--status 'runing' is not a run status: use one of running, completed, failed, cancelled"
        in " ".join(proc.stderr.split())
    )
    proc = await asyncio.to_thread(system.cli, "runs", "--status", "cancelled", "--json")
    assert proc.returncode == 0, proc.stderr


async def test_a_token_added_to_the_file_works_without_a_restart(system: System) -> None:
    async with system.http(LATE) as http:
        assert (await http.get("/api/runs")).status_code == 401
        grants = yaml.safe_load(system.tokens.read_text())
        grants[LATE] = {"subject": "lee", "role": "viewer"}
        system.tokens.write_text(yaml.safe_dump(grants))
        reply = await http.get("/api/runs")
        assert reply.status_code == 200, reply.text
        # Removed again, it no longer works.
        del grants[LATE]
        system.tokens.write_text(yaml.safe_dump(grants))
        assert (await http.get("/api/runs")).status_code == 401
    assert "http" not in system.supervisor.exited()


async def test_the_home_is_absolute_whatever_the_working_directory(
    system: System, tmp_path: Path
) -> None:
    relative = Settings.from_env(".cairn-here", environ={"CAIRN_STORE": "events.db"})
    assert relative.home == Path.cwd() / ".cairn-here"
    assert relative.store == str(Path.cwd() / "events.db")
    assert Settings(home=Path("x")).home == Path.cwd() / "x"
    # A command run from elsewhere with a home relative to there finds that home's views.
    home = system.settings.home
    proc = await asyncio.to_thread(
        system.cli, "runs", "--json", "--home", home.name, cwd=home.parent
    )
    assert proc.returncode == 0, proc.stderr


# -- dead letters, read back ------------------------------------------------------------------


async def test_dead_letters_are_counted_by_reason_and_listed_by_run(system: System) -> None:
    """Refused messages are kept in CAIRN_DLQ; `cairn dead-letters` and GET /api/dead-letters
    count them by source and reason and list them by run, and a letter that is not one (anyone
    allowed a dead-letter subject may publish there) is shown as unreadable, never dropped."""
    js = system.client.nc.jetstream()
    run_id = uuid.uuid4()  # no such run: every result for it is refused
    now = datetime.now(UTC).isoformat()
    for attempt in (1, 2, 3):
        result = {
            "v": 1, "task_id": f"{run_id}:plan:{attempt}", "run_id": str(run_id), "step": "plan",
            "attempt": attempt, "agent_id": "nobody-1", "output": {}, "started_at": now,
            "finished_at": now,
        }  # fmt: skip
        await js.publish(result_subject("planner", run_id), json.dumps(result).encode())
    await js.publish(result_subject("planner", run_id), b"{not json")
    await js.publish(dlq_subject("agent.mallory"), b"not a dead letter")

    async def all_kept() -> DeadLetterReport | None:
        report = await system.client.dead_letters(run=str(run_id)[:8], limit=2)
        return report if report.matched == 4 else None

    report = await poll(all_kept, what="the four letters about the run")
    unknown = "result for unknown run <id>"  # the same rule, whatever the ids
    counts = {(r.source, r.reason): r.letters for r in report.by_reason}
    assert counts.pop(("coordinator.planner", unknown)) == 3
    [((source, bad_json), once)] = counts.items()
    assert (source, once) == ("coordinator.planner", 1)
    assert "JSON" in bad_json, bad_json
    assert [letter.seq for letter in report.letters] == sorted(
        (letter.seq for letter in report.letters), reverse=True
    )
    assert len(report.letters) == 2  # the newest two, as asked
    assert {(letter.run_id, letter.source) for letter in report.letters} == {
        (run_id, "coordinator.planner")
    }
    assert report.by_source["coordinator.planner"] >= 4
    assert report.by_source["agent.mallory"] == 1

    mallory = await system.client.dead_letters(source="agent.mallory")
    assert mallory.matched == 1
    [odd] = mallory.letters
    assert odd.letter is None
    assert odd.summary()["reason"].startswith("unreadable dead letter: ")

    shown = system.cli("dead-letters", "--run", str(run_id)[:8])
    assert shown.returncode == 0, shown.stderr
    assert "4 of them match run" in shown.stdout
    assert "result for unknown run <id>" in shown.stdout
    listed = json.loads(system.cli("dead-letters", "--run", str(run_id), "--json").stdout)
    assert listed["matched"] == 4
    assert {row["run_id"] for row in listed["letters"]} == {str(run_id)}
    assert "{not json" in [row["payload"] for row in listed["letters"]]
    # A letter's words are the publisher's: shown as text, never as terminal codes or markup.
    hostile = DeadLetter(
        subject="x", reason="\x1b[2J[red]cleared[/]", payload="", service="coordinator",
        received_at=datetime.now(UTC),
    )  # fmt: skip
    await js.publish(dlq_subject("agent.mallory"), hostile.model_dump_json().encode())

    async def both_kept() -> bool:
        return (await system.client.dead_letters(source="agent.mallory")).matched == 2

    await poll(both_kept, what="the hostile letter")
    shown = system.cli("dead-letters", "--source", "agent.mallory")
    assert "\\x1b[2J[red]cleared[/]" in shown.stdout
    assert "\x1b" not in shown.stdout
    refused = system.cli("dead-letters", "--run", "zz")
    assert refused.returncode == 2
    assert "is not a run id or the start of one" in refused.stderr
    wildcard = system.cli("dead-letters", "--source", "agent.>")
    assert wildcard.returncode == 2
    assert "is not a source" in wildcard.stderr

    async with system.http() as http:
        reply = await http.get("/api/dead-letters", params={"run": str(run_id), "limit": 10})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["matched"] == 4
        expected = {"source": "coordinator.planner", "reason": unknown, "letters": 3}
        assert expected in body["by_reason"]
        assert [row["subject"] for row in body["letters"]] == [
            result_subject("planner", run_id)
        ] * 4
        assert "payload" not in body["letters"][0]  # the CLI shows it; the API does not
        page = await http.get("/agents")  # the dashboard shows them where agents are
        assert page.status_code == 200
        assert "Refused messages" in page.text
        assert "<td>coordinator.planner</td><td>result for unknown run &lt;id&gt;</td>" in page.text
        assert "cairn dead-letters" in page.text
        assert (await http.get("/api/dead-letters", params={"limit": 5000})).status_code == 422
        wild = await http.get("/api/dead-letters", params={"source": "agent.*"})
        assert wild.status_code == 422
        assert (await http.get("/api/dead-letters", params={"run": "x" * 40})).status_code == 422
