"""An event is encoded once for all its uses (stored bytes, hashed bytes, hash, live notice):
each must equal the plain canonical encoding of the event it stands for. The hash covers the
event's topic (type and version) as well as every field."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cairn.events import (
    EventNotice,
    ResultReceived,
    RunCompleted,
    RunFailed,
    TaskError,
    TaskResult,
    Usage,
)
from cairn.events.codec import canonical_json, decode_event, encode_event, event_hash, event_json
from cairn.events.mappings import notice_bytes, notice_of, received_fields, result_of

keys = st.sampled_from(["run_id", "seq", "a", "z", "ü", "step", ""]) | st.text(max_size=5)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=20,
)  # fmt: skip


@given(output=json_values, seq=st.integers(min_value=1, max_value=10**9), reason=st.text())
def test_one_encoding_equals_the_canonical_one(output: Any, seq: int, reason: str) -> None:
    run = uuid.uuid4()
    at = datetime(2026, 1, 1, tzinfo=UTC)
    for event in (
        RunCompleted(run_id=run, seq=seq, at=at, actor="c", reason=reason, output=output),
        RunFailed(run_id=run, seq=seq, at=at, actor="c", reason=reason, error="e", step=None),
    ):
        full = canonical_json(event.model_dump(mode="json"))
        # Asked for in either order, the answers are the same.
        topic = f"{event.type_name()}@{event.version}".encode()
        assert event_hash(event) == hashlib.sha256(topic + b"\n" + full).hexdigest()
        assert event_json(event) == full
        stored = encode_event(event)
        assert stored == canonical_json(event.model_dump(mode="json", exclude={"run_id", "seq"}))
        back = decode_event(f"{event.type_name()}@{event.version}", stored, run, seq)
        assert back == event
        assert event_hash(back) == event_hash(event)


@given(output=json_values, position=st.integers(min_value=1, max_value=2**62), reason=st.text())
def test_a_notice_written_around_the_stored_bytes_is_the_notice_of_the_event(
    output: Any, position: int, reason: str
) -> None:
    event = RunCompleted(
        run_id=uuid.uuid4(), seq=3, at=datetime(2026, 1, 1, tzinfo=UTC), actor="c",
        reason=reason, output=output,
    )  # fmt: skip
    fast = EventNotice.model_validate_json(notice_bytes(position, event))
    assert fast == notice_of(position, event)


@given(
    output=st.none() | st.dictionaries(keys, json_values, max_size=3),
    review=st.none() | st.text(max_size=10),
    error=st.none() | st.tuples(st.text(max_size=10), st.booleans()),
)
def test_a_result_recorded_as_received_comes_back_as_the_same_result(
    output: dict[str, Any] | None, review: str | None, error: tuple[str, bool] | None
) -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    run = uuid.uuid4()
    result = TaskResult(
        task_id=f"{run}:plan:1", run_id=run, step="plan", attempt=1, agent_id="a",
        output=output, review=review, started_at=at, finished_at=at,
        error=TaskError(message=error[0], retryable=error[1]) if error else None,
        usage=[Usage(model="m", input_tokens=3, output_tokens=4)],
    )  # fmt: skip
    received = ResultReceived(
        run_id=run, seq=2, at=at, actor="agent:a", reason="r", **received_fields(result)
    )
    assert result_of(received) == result


def test_a_problem_is_one_line() -> None:
    from pydantic import ValidationError

    from cairn.events import TaskFailed
    from cairn.events.validation import problem_line

    try:
        TaskFailed.model_validate({"run_id": str(uuid.uuid4()), "seq": 1, "extra": 1})
    except ValidationError as exc:
        line = problem_line(exc)
    assert "\n" not in line
    assert ": Field required; " in line
    assert line.endswith("more)")
    assert problem_line(ValueError("two\nlines")) == "two lines"
