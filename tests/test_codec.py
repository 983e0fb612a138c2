"""An event is encoded once for all its uses (stored bytes, hashed bytes, hash, live notice):
each must equal the plain canonical encoding of the event it stands for."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cairn.events import RunCompleted, RunFailed
from cairn.events.codec import canonical_json, decode_event, encode_event, event_hash, event_json

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
        assert event_hash(event) == hashlib.sha256(full).hexdigest()
        assert event_json(event) == full
        stored = encode_event(event)
        assert stored == canonical_json(event.model_dump(mode="json", exclude={"run_id", "seq"}))
        back = decode_event(f"{event.type_name()}@{event.version}", stored, run, seq)
        assert back == event
        assert event_hash(back) == event_hash(event)
