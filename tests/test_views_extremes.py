"""The read side never dies on a committed event: whatever value the stored events' models
accept (huge token counts, amounts with any exponent, any text, NUL characters included)
folds into the views on SQLite and PostgreSQL, and the runner goes on past it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from views_backends import BACKENDS, backend_settings

from cairn.events import (
    CostCharged,
    Event,
    Intent,
    RunFailed,
    RunStarted,
    TaskDispatched,
    TaskFailed,
    WorkflowSpec,
    event_hash,
)
from cairn.projections import ProjectionRunner, Views
from cairn.runtime.eventlog.store import EventStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
WORKFLOW = WorkflowSpec.model_validate(
    {"name": "w", "steps": [{"name": "s", "capability": "c", "input": {}}]}
)

counts = st.integers(min_value=0, max_value=10**40)
amounts = st.decimals(
    min_value=Decimal(0), max_value=Decimal("1e30"), allow_nan=False, allow_infinity=False,
    places=None,
) | st.sampled_from([Decimal("1E-30"), Decimal("123456789012345678901234567890.5")])  # fmt: skip
texts = st.text(max_size=300) | st.sampled_from(["\x00", "a\x00b", "\ud7ff", "é" * 2000])


def run_events(
    run: uuid.UUID, tokens: tuple[int, int], amount: Decimal, words: list[str]
) -> list[Event]:
    """A run whose events carry the values given, linked as cairn links them."""
    made: list[Event] = []

    def add(cls: type[Event], **fields: Any) -> None:
        seq = len(made) + 1
        link = event_hash(made[-1]) if made else ""
        made.append(cls(run_id=run, seq=seq, at=T0 + timedelta(seconds=seq), prev_hash=link,
                        **fields))  # fmt: skip

    add(RunStarted, actor=words[0] or "client:x", reason=words[1], workflow=WORKFLOW,
        input={"v": tokens[0], "w": words[2]}, intent=Intent(goal=words[3]),
        tenant="default")  # fmt: skip
    add(TaskDispatched, actor="coordinator", reason=words[4], task_id=f"{run}:s:1", step="s",
        attempt=1, capability="c", input={"x": words[5]}, intent=Intent(goal=words[3]),
        timeout_s=1.0)  # fmt: skip
    add(CostCharged, actor="coordinator", reason=words[6], task_id=f"{run}:s:1", step="s",
        capability="c", agent_id=words[7], model=words[8], input_tokens=tokens[0],
        output_tokens=tokens[1], price_table="t", amount_usd=amount)  # fmt: skip
    add(TaskFailed, actor=f"agent:{words[9]}", reason=words[10], task_id=f"{run}:s:1", step="s",
        attempt=1, agent_id=words[7], error=words[11], retryable=False)  # fmt: skip
    add(RunFailed, actor="coordinator", reason=words[12], step="s", error=words[11])
    return made


@pytest.mark.parametrize("backend", BACKENDS)
@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    tokens=st.tuples(counts, counts),
    amount=amounts,
    words=st.lists(texts, min_size=13, max_size=13),
)
def test_any_value_the_events_allow_folds_into_the_views(
    backend: str, tmp_path: Path, tokens: tuple[int, int], amount: Decimal, words: list[str]
) -> None:
    home = tmp_path / uuid.uuid4().hex
    with backend_settings(backend, home) as config:
        store = EventStore.from_settings(config)
        try:
            run = uuid.uuid4()
            after = uuid.uuid4()
            store.append(run_events(run, tokens, amount, words))
            # A plain run after it: the runner goes on past the extreme one.
            store.append(run_events(after, (1, 2), Decimal("0.5"), ["ok"] * 13))
            with ProjectionRunner(config) as runner:
                runner.run_once()
            with Views(config) as views:
                assert views.position() == store.last_position()
                shown = views.run(str(run))
                assert shown is not None
                assert shown.status == "failed"
                assert shown.cost_usd == amount
                (row,) = views.costs(by="run", run_id=str(run))
                assert row.amount_usd == amount
                assert len(views.audit(run_id=str(run), limit=None)) == 5
                plain = views.run(str(after))
                assert plain is not None
                assert plain.cost_usd == Decimal("0.5")
        finally:
            store.close()
