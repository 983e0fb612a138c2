"""`cairn fork`: retry from the point a run went wrong, without paying again for what was done."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cairn.events import CostCharged, OutputCarried, RunStarted, TaskCompleted
from cairn.runtime.client import TERMINAL_TYPES, CairnClient
from cairn.runtime.eventlog.store import EventStore
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import Supervisor

pytestmark = pytest.mark.timeout(90)


async def follow_to_end(client: CairnClient, run_id: uuid.UUID, feed: object) -> str:
    kinds: list[str] = []
    while not kinds or kinds[-1] not in TERMINAL_TYPES:
        kinds.append((await feed.next(timeout=30)).type)  # type: ignore[attr-defined]
    return kinds[-1]


async def test_fork_takes_over_done_steps_and_reruns_what_an_override_invalidates(
    settings: Settings, supervisor: Supervisor, client: CairnClient, tmp_path: Path
) -> None:
    supervisor.start_all()
    await client.wait_ready()
    parent = uuid.uuid4()
    feed = await client.follow(parent)
    assert (await client.start_run("research-report", {"topic": "moss"}, run_id=parent)).ok
    assert await follow_to_end(client, parent, feed) == "RunCompleted"
    await feed.close()
    store = EventStore(settings.store)
    history = store.load(parent)
    research_done = next(
        e.seq for e in history if isinstance(e, TaskCompleted) and e.step == "research"
    )

    fixed = {
        "findings": [{"question": "what is moss?", "answer": "a small plant", "confidence": 1}]
    }
    override = tmp_path / "research.json"
    override.write_text(json.dumps(fixed))
    env = {**os.environ, **settings.env()}
    proc = subprocess.run(
        [sys.executable, "-m", "cairn.cli", "fork", str(parent), "--at",
         str(research_done), "--override", f"research={override}", "--json"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    child = uuid.UUID(json.loads(proc.stdout)["run_id"])
    deadline = asyncio.get_running_loop().time() + 30
    while True:  # poll the store: the fork was started by another process
        events = store.load(child)
        if events and events[-1].type_name() in TERMINAL_TYPES:
            break
        assert asyncio.get_running_loop().time() < deadline, [e.type_name() for e in events]
        await asyncio.sleep(0.05)
    kinds = [e.type_name() for e in events]
    assert kinds[-1] == "RunCompleted", kinds
    started = events[0]
    assert isinstance(started, RunStarted)
    assert started.forked_from is not None
    assert started.forked_from.run_id == parent
    carried = {e.step: e.source for e in events if isinstance(e, OutputCarried)}
    assert set(carried) == {"plan", "research"}
    assert carried["research"].startswith("override by")
    charged_steps = {e.step for e in events if isinstance(e, CostCharged)}
    assert charged_steps == {"write", "review"}  # plan and research were not paid again
    write_input = next(
        e.input
        for e in events
        if e.type_name() == "TaskDispatched" and e.step == "write"  # type: ignore[attr-defined]
    )
    assert write_input["findings"] == fixed["findings"]

    # A forked run replays like any other: its carried outputs are part of its start.
    from cairn.coordinator.domain.facts import Policy
    from cairn.coordinator.history.replay import check_history
    from cairn.coordinator.pricing import load_price_table
    from cairn.coordinator.workflow import load_contract_modules
    from cairn.events.contracts import resolve_contract

    load_contract_modules()

    report = check_history(events, Policy(load_price_table(), resolve_contract))
    assert report.ok, report.divergence

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"findings": []}))
    refused = subprocess.run(
        [sys.executable, "-m", "cairn.cli", "fork", str(parent), "--at", "3",
         "--override", f"research={bad}"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "Research@1" in refused.stderr
    store.close()


def fork_cli(settings: Settings, *args: str, code: int = 0) -> str:
    env = {**os.environ, **settings.env()}
    proc = subprocess.run(
        [sys.executable, "-m", "cairn.cli", "fork", *args],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == code, proc.stdout + proc.stderr
    return proc.stdout if code == 0 else proc.stderr


async def test_fork_with_another_model_reruns_the_step_and_what_was_built_from_it(
    settings: Settings, supervisor: Supervisor, client: CairnClient
) -> None:
    from cairn.events import ResultReceived, TaskDispatched
    from cairn.events.mappings import envelope_bytes, envelope_of

    supervisor.start_all()
    await client.wait_ready()
    parent = uuid.uuid4()
    feed = await client.follow(parent)
    assert (await client.start_run("research-report", {"topic": "moss"}, run_id=parent)).ok
    assert await follow_to_end(client, parent, feed) == "RunCompleted"
    await feed.close()
    store = EventStore(settings.store)
    history = store.load(parent)
    research_done = next(
        e for e in history if isinstance(e, TaskCompleted) and e.step == "research"
    )

    out = fork_cli(settings, str(parent), "--at", str(history[-1].seq),
                   "--set-model", "research=gpt-4o", "--json")  # fmt: skip
    child = uuid.UUID(json.loads(out)["run_id"])
    deadline = asyncio.get_running_loop().time() + 30
    while True:  # poll the store: the fork was started by another process
        events = store.load(child)
        if events and events[-1].type_name() in TERMINAL_TYPES:
            break
        assert asyncio.get_running_loop().time() < deadline, [e.type_name() for e in events]
        await asyncio.sleep(0.05)
    assert events[-1].type_name() == "RunCompleted", [e.type_name() for e in events]

    # The record says so: the fork's start names the model, for the step and as the fork's own.
    started = events[0]
    assert isinstance(started, RunStarted)
    assert started.forked_from is not None
    assert started.forked_from.models == {"research": "gpt-4o"}
    assert started.workflow.step("research").model == "gpt-4o"
    assert {e.step for e in events if isinstance(e, OutputCarried)} == {"plan"}

    dispatched = {e.step: e for e in events if isinstance(e, TaskDispatched)}
    assert dispatched["research"].model == "gpt-4o"
    assert dispatched["write"].model is None
    envelope = envelope_of(dispatched["research"])
    assert envelope.model == "gpt-4o"
    assert b'"model":"gpt-4o"' in envelope_bytes(envelope)
    assert b'"model"' not in envelope_bytes(envelope_of(dispatched["write"]))

    # The agent answered with that model, and was charged for it; plan was not paid again.
    result = next(e for e in events if isinstance(e, ResultReceived) and e.step == "research")
    assert {u.model for u in result.usage} == {"gpt-4o"}
    charges = {(e.step, e.model) for e in events if isinstance(e, CostCharged)}
    assert charges == {
        ("research", "gpt-4o"),
        ("write", "cairn-offline-1"),
        ("review", "cairn-offline-1"),
    }
    redone = next(e for e in events if isinstance(e, TaskCompleted) and e.step == "research")
    assert redone.output_hash != research_done.output_hash  # another model, another answer

    from cairn.coordinator.domain.facts import Policy
    from cairn.coordinator.history.replay import check_history
    from cairn.coordinator.pricing import load_price_table
    from cairn.coordinator.workflow import load_contract_modules
    from cairn.events.contracts import resolve_contract

    load_contract_modules()
    report = check_history(events, Policy(load_price_table(), resolve_contract))
    assert report.ok, report.divergence

    assert "--set-model takes STEP=NAME" in fork_cli(
        settings, str(parent), "--at", "3", "--set-model", "research", code=2
    )
    assert "run has no step 'nope'" in fork_cli(
        settings, str(parent), "--at", "3", "--set-model", "nope=gpt-4o", code=1
    )
    store.close()
