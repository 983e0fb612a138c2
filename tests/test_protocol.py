"""The open protocol: the generated AsyncAPI document, and an agent with no cairn code in it."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, cast

import pytest
from pydantic import BaseModel

from cairn.events import (
    DeadLetter,
    EventNotice,
    Intent,
    TaskCompleted,
    TaskEnvelope,
    TaskResult,
    protocol,
    wire,
)
from cairn.events.asyncapi import SCHEMA_REF, asyncapi_document, command_subjects
from cairn.runtime.client import TERMINAL_TYPES, CairnClient
from cairn.runtime.eventlog.store import EventStore
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import Supervisor

PLAIN_AGENT = Path(__file__).with_name("plain_agent.py")
# The subject functions called with `{parameter}` placeholders, as the document writes them.
_RUN = cast(uuid.UUID, "{run_id}")
TASK = protocol.task_subject("{capability}")
RESULT = protocol.result_subject("{capability}", _RUN)
EVENT = protocol.event_subject(_RUN, "{event_type}")
DLQ = protocol.dlq_subject("{source}")


def cairn_cli(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "cairn.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    if isinstance(node, dict) and set(node) == {"$ref"}:
        return resolve(doc, node["$ref"])  # a reference to a reference
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def test_asyncapi_document_is_generated_from_the_code() -> None:
    doc = json.loads(cairn_cli("protocol", "--asyncapi"))
    assert doc == json.loads(json.dumps(asyncapi_document()))
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["version"] == str(wire.PROTOCOL_VERSION)

    addresses = {c["address"] for c in doc["channels"].values()}
    assert set(command_subjects().values()) | {TASK, RESULT, EVENT, DLQ} <= addresses
    # Every command constant and subject function protocol.py defines has a channel: a new
    # subject function must be added to the generator (and to docs/protocol.md).
    assert {v for k, v in vars(protocol).items() if k.startswith("CMD_")} <= addresses
    functions = {k for k, v in vars(protocol).items() if k.endswith("_subject") and callable(v)}
    assert functions == {"task_subject", "result_subject", "event_subject", "dlq_subject"}

    # Every reference resolves inside the document.
    for ref in refs(doc):
        resolve(doc, ref)

    # Payloads are the models' own schemas.
    by_address = {c["address"]: c for c in doc["channels"].values() if c["address"]}
    carried: dict[str, type[BaseModel]] = {
        TASK: TaskEnvelope,
        RESULT: TaskResult,
        DLQ: DeadLetter,
        protocol.CMD_START: wire.StartRun,
        protocol.CMD_CANCEL: wire.CancelRun,
        protocol.CMD_APPROVE: wire.ApprovalDecision,
        protocol.CMD_DENY: wire.ApprovalDecision,
        protocol.CMD_BUDGET: wire.RaiseBudget,
        EVENT: EventNotice,
    }
    schemas = doc["components"]["schemas"]
    for address, model in carried.items():
        (message_ref,) = [m["$ref"] for m in by_address[address]["messages"].values()]
        payload = resolve(doc, message_ref)["payload"]
        expected_schema = model.model_json_schema(ref_template=SCHEMA_REF)
        definitions = expected_schema.pop("$defs", {})
        assert resolve(doc, payload["$ref"]) == expected_schema, model.__name__
        for name, definition in definitions.items():
            assert schemas[name] == definition, name
    start = doc["operations"]["receive_cmdStart"]
    reply = resolve(doc, start["reply"]["messages"][0]["$ref"])
    assert resolve(doc, reply["payload"]["$ref"]) == wire.CommandReply.model_json_schema(
        ref_template=SCHEMA_REF
    )
    # Whatever else carries a model (commands added later, too) carries its own schema.
    for message in doc["components"]["messages"].values():
        if "payload" in message:
            model = getattr(wire, message["title"])
            expected_schema = model.model_json_schema(ref_template=SCHEMA_REF)
            expected_schema.pop("$defs", None)
            assert resolve(doc, message["payload"]["$ref"]) == expected_schema
    result_message = resolve(doc, by_address[RESULT]["messages"]["TaskResult"]["$ref"])
    assert "Nats-Msg-Id" in result_message["headers"]["properties"]


def test_protocol_lists_subjects() -> None:
    out = cairn_cli("protocol")
    for subject in (
        protocol.CMD_START,
        "cairn.task.{capability}",
        "cairn.result.{capability}.{run_id}",
    ):
        assert subject in out


def test_the_plain_agent_imports_no_cairn() -> None:
    tree = ast.parse(PLAIN_AGENT.read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0] for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 0
    }  # fmt: skip
    assert "cairn" not in imported
    assert imported <= {"__future__", "asyncio", "json", "secrets", "signal", "sys",
                        "datetime", "typing", "nats"}  # fmt: skip
    assert "cairn" not in {line.split()[1] for line in PLAIN_AGENT.read_text().splitlines()
                           if line.startswith(("import ", "from "))}  # fmt: skip


@pytest.mark.timeout(90)
async def test_an_agent_in_plain_nats_completes_a_step(
    settings: Settings, supervisor: Supervisor, client: CairnClient
) -> None:
    supervisor.start("coordinator", "cairn.coordinator")
    await client.wait_ready(timeout=30)
    for name in ("researcher", "writer", "reviewer"):
        supervisor.start(f"agent-{name}", f"cairn.agents.examples.{name}")
    agent_id = f"plain-planner-{uuid.uuid4().hex[:6]}"
    plain = subprocess.Popen(
        [sys.executable, str(PLAIN_AGENT), settings.resolved_nats_url() or "", agent_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert plain.stdout is not None
        assert plain.stdout.readline().strip() == f"ready {agent_id}"

        run_id = uuid.uuid4()
        feed = await client.follow(run_id)
        try:
            reply = await client.start_run(
                "research-report",
                {"topic": "tides"},
                intent=Intent(goal="a report on tides"),
                run_id=run_id,
            )
            assert reply.ok, reply.error
            notices: list[EventNotice] = []
            while not notices or notices[-1].type not in TERMINAL_TYPES:
                notices.append(await feed.next(timeout=30))
        finally:
            await feed.close()
        assert notices[-1].type == "RunCompleted", notices[-1]

        store = EventStore(settings.store)
        try:
            completed = {e.step: e for e in store.load(run_id) if isinstance(e, TaskCompleted)}
        finally:
            store.close()
        assert completed["plan"].agent_id == agent_id
        assert completed["research"].agent_id.startswith("researcher")
        assert set(completed) == {"plan", "research", "write", "review"}
    finally:
        plain.terminate()
        _, err = plain.communicate(timeout=10)
    assert plain.returncode == 0, err
