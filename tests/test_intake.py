"""What a run is started with, checked at the door (issue parts 5–7): input schemas and the
`$input` references, the workflow catalog that reloads `<home>/workflows` and survives a broken
file. The same against a real coordinator process is in tests/test_intake_process.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from cairn.coordinator.intake import InputError, check_input
from cairn.coordinator.workflow import WorkflowCatalog, WorkflowError, parse_workflow
from cairn.events import RunStarted, WorkflowSpec, decode_event, encode_event


def workflow(**changes: Any) -> WorkflowSpec:
    data: dict[str, Any] = {
        "name": "w",
        "steps": [
            {
                "name": "a",
                "capability": "c",
                "input": {"topic": "$input.topic", "tone": "$input.style.tone ?? plain"},
            }
        ],
    }
    return parse_workflow({**data, **changes})


def refusal(spec: WorkflowSpec, data: dict[str, Any]) -> str:
    with pytest.raises(InputError) as caught:
        check_input(spec, data)
    return str(caught.value)


def test_without_a_schema_the_input_must_hold_what_the_steps_refer_to() -> None:
    spec = workflow(output={"t": "$input.title"})
    assert refusal(spec, {}) == (
        "the input lacks what workflow 'w' refers to: "
        "input.topic: missing (step 'a' refers to $input.topic); "
        "input.title: missing (the workflow's output refers to $input.title); "
        "give those fields (or a `?? default` on the reference in the workflow)"
    )
    # A `?? default` makes a reference optional; what is there may be anything.
    check_input(spec, {"topic": 7, "title": None})
    check_input(workflow(), {"topic": "x", "style": {}})


def test_a_named_model_is_the_input_schema() -> None:
    spec = workflow(input_schema="ReportInput@1")
    assert refusal(spec, {}) == (
        "the input does not fit the input schema of workflow 'w' (ReportInput@1): "
        "input.topic: Field required; correct the input and start the run again"
    )
    assert "input.topc: Extra inputs are not permitted" in refusal(spec, {"topc": "tides"})
    assert "input.topic: String should have at least 1 character" in refusal(spec, {"topic": ""})
    check_input(spec, {"topic": "tides", "audience": "children"})


def test_a_json_schema_is_the_input_schema() -> None:
    schema = {
        "type": "object",
        "required": ["topic", "pages"],
        "properties": {"topic": {"type": "string"}, "pages": {"type": "integer", "minimum": 1}},
    }
    spec = workflow(input_schema=schema)
    assert refusal(spec, {}) == (
        "the input does not fit the input schema of workflow 'w' (JSON Schema): "
        "input.topic: Field required; input.pages: Field required; "
        "correct the input and start the run again"
    )
    message = refusal(spec, {"topic": 3, "pages": 0})
    assert "input.pages: 0 is less than the minimum of 1" in message
    assert "input.topic: 3 is not of type 'string'" in message
    check_input(spec, {"topic": "tides", "pages": 2})


def test_a_schema_that_cannot_be_used_is_refused_with_the_workflow() -> None:
    with pytest.raises(WorkflowError, match="input_schema 'Nope@1' names no registered model"):
        workflow(input_schema="Nope@1")
    with pytest.raises(WorkflowError, match="input_schema is not a valid JSON Schema at type"):
        workflow(input_schema={"type": "objekt"})


def test_the_example_workflows_ship_a_schema() -> None:
    catalog = WorkflowCatalog()
    for name in ("research-report", "reviewed-report"):
        spec = catalog.get(name)
        assert spec.input_schema == "ReportInput@1"
        assert "input.topic: Field required" in refusal(spec, {})
        check_input(spec, {"topic": "tides", "goal": "explain tides"})


def test_a_workflow_without_a_schema_records_as_before() -> None:
    """The schema is left out of the encoding while unset: RunStarted of a workflow without one
    stores the same bytes as before, and one with a schema reads back whole."""
    from datetime import UTC, datetime
    from uuid import uuid4

    from cairn.events import Intent

    for spec in (workflow(), workflow(input_schema="ReportInput@1")):
        event = RunStarted(
            run_id=uuid4(), seq=1, at=datetime.now(UTC), actor="client:t", workflow=spec,
            input={"topic": "x"}, intent=Intent(goal="g"),
        )  # fmt: skip
        stored = encode_event(event)
        assert (b"input_schema" in stored) == (spec.input_schema is not None)
        assert decode_event(f"RunStarted@{RunStarted.version}", stored, event.run_id, 1) == event
    # What version 2 wrote reads as version 3.
    old = encode_event(event)
    assert decode_event("RunStarted@2", old, event.run_id, 1) == event


# -- the catalog ------------------------------------------------------------------------------

GOOD = "name: {name}\nsteps:\n  - name: a\n    capability: c\n"


def test_the_catalog_takes_in_files_added_changed_and_removed(tmp_path: Path) -> None:
    folder = tmp_path / "workflows"
    catalog = WorkflowCatalog([folder], recheck_s=3600)  # the folder does not exist yet
    with pytest.raises(WorkflowError, match="unknown workflow 'late'"):
        catalog.get("late")
    folder.mkdir()
    (folder / "late.yaml").write_text(GOOD.format(name="late"))
    # An unknown name looks again at once, whatever the interval.
    assert catalog.get("late").name == "late"

    # A change counts at the next look (the interval has passed).
    catalog = WorkflowCatalog([folder], recheck_s=0)
    path = folder / "late.yaml"
    path.write_text(GOOD.format(name="late") + "description: changed\n")
    assert catalog.get("late").description == "changed"
    path.unlink()
    with pytest.raises(WorkflowError, match="unknown workflow 'late'"):
        catalog.get("late")


def test_a_broken_file_is_named_and_the_others_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "workflows"
    folder.mkdir()
    (folder / "fine.yaml").write_text(GOOD.format(name="fine"))
    (folder / "broken.yaml").write_text("name: broken\nsteps: [\n")
    (folder / "wrong.yml").write_text("name: wrong\nsteps:\n  - name: a\n")
    catalog = WorkflowCatalog([folder], recheck_s=0)
    assert catalog.get("fine").name == "fine"
    assert "research-report" in catalog.names()
    assert set(catalog.broken) == {folder / "broken.yaml", folder / "wrong.yml"}
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(str(folder / "broken.yaml") in line for line in logged), logged

    with pytest.raises(WorkflowError) as caught:
        catalog.get("broken")
    assert str(caught.value).startswith(f"workflow 'broken' is not loaded: {folder}/broken.yaml")
    with pytest.raises(WorkflowError) as caught:
        catalog.get("nothing")
    assert "not loaded, see the coordinator's log: broken.yaml, wrong.yml" in str(caught.value)

    # Mended, it loads; broken again, it is dropped and named again.
    (folder / "broken.yaml").write_text(GOOD.format(name="broken"))
    assert catalog.get("broken").name == "broken"
    (folder / "fine.yaml").write_text("steps: {")
    stat = (folder / "fine.yaml").stat()
    os.utime(folder / "fine.yaml", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    with pytest.raises(WorkflowError, match="workflow 'fine' is not loaded"):
        catalog.get("fine")


# -- capabilities nobody serves ---------------------------------------------------------------


def test_a_capability_is_served_while_a_replica_pulls_works_or_was_just_handed_a_task() -> None:
    from datetime import UTC, datetime, timedelta

    from cairn.runtime.capabilities import CapabilityConsumer, unserved, unserved_warning

    now = datetime.now(UTC)

    def consumer(name: str, **counts: Any) -> CapabilityConsumer:
        fields: dict[str, Any] = {
            "waiting_pulls": 0, "in_flight": 0, "queued": 0, "redelivered": 0,
            "last_delivered_at": None, "last_acked_at": None, **counts,
        }  # fmt: skip
        return CapabilityConsumer(capability=name, consumer=f"cairn-agent-{name}", **fields)

    consumers = [
        consumer("pulling", waiting_pulls=1),
        consumer("working", in_flight=2),
        consumer("just-now", last_delivered_at=now - timedelta(seconds=5)),
        consumer("long-ago", last_delivered_at=now - timedelta(minutes=5), queued=3),
    ]
    wanted = ["pulling", "working", "just-now", "long-ago", "never", "pulling"]
    assert unserved(wanted, consumers, now) == ["long-ago", "never"]
    assert unserved_warning({"planer": ["plan"], "writter": ["draft", "redraft"]}) == (
        "no live agent serves 'planer' (step plan); 'writter' (steps draft, redraft): the run "
        "waits for one until the step times out; check the capability's spelling, or start an "
        "agent that serves it"
    )
