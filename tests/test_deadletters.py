"""Reading dead letters back: which run a letter concerns, and reasons counted by rule."""

from __future__ import annotations

import json
import uuid

from cairn.events import result_subject
from cairn.runtime.deadletters import reason_kind, run_of

RUN = uuid.UUID("2bd6050c-0e65-4687-b708-ac7225601e11")


def test_the_run_comes_from_a_results_subject_before_its_body() -> None:
    other = uuid.uuid4()
    body = json.dumps({"run_id": str(other)})
    assert run_of(result_subject("writer", RUN), body) == RUN
    assert run_of("cairn.cmd.cancel", body) == other
    assert run_of("cairn.task.writer", json.dumps({"v": 1, "run_id": str(RUN)})) == RUN


def test_a_letter_that_names_no_run_concerns_none() -> None:
    assert run_of("cairn.cmd.start", "{not json") is None
    assert run_of("cairn.cmd.start", '{"run_id": "not-a-uuid"}') is None
    assert run_of("cairn.cmd.start", '{"run_id": 7}') is None
    assert run_of("cairn.cmd.start", "[1, 2]") is None
    assert run_of("cairn.result.writer.not-a-uuid", "{}") is None
    cut = json.dumps({"run_id": str(RUN), "output": "x" * 100})[:40]  # a 64 KiB excerpt
    assert run_of("cairn.cmd.start", cut) is None


def test_reasons_count_together_whatever_their_ids_and_numbers() -> None:
    first = reason_kind(f"another copy of the result for task {RUN}:review:1, already recorded")
    second = reason_kind(
        f"another copy of the result for task {uuid.uuid4()}:review:3, already recorded"
    )
    assert (
        first == second == "another copy of the result for task <id>:review:<n>, already recorded"
    )
    assert reason_kind("usage 1e30 is past 1,000,000 tokens") == "usage <n> is past <n> tokens"
    assert reason_kind("step plan2 of v2") == "step plan2 of v2"  # digits inside names stay
    assert len(reason_kind("x" * 5000)) == 200
