"""Reading dead letters back: which run a letter concerns, and reasons counted by rule."""

from __future__ import annotations

import json
import math
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cairn.events import result_subject
from cairn.runtime.deadletters import _MAYBE_NON_FINITE, read_dead_letters, reason_kind, run_of

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
    assert run_of("cairn.cmd.start", '{"a":' + "[" * 100_000) is None  # nesting past Python's
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


# -- the quick look for numbers that are not finite --------------------------------------------

_WS = st.sampled_from(["", " ", "\n", "\t ", "\r\n  "])
_EXPONENT = st.builds(
    lambda e, sign, n: f"{e}{sign}{n}",
    st.sampled_from("eE"),
    st.sampled_from(["", "+", "-"]),
    st.integers(0, 999),
)
_NUMBER = st.builds(
    lambda sign, whole, frac, exp: f"{sign}{whole}{frac}{exp}",
    st.sampled_from(["", "-"]),
    st.from_regex(r"\A(0|[1-9][0-9]{0,3})\Z"),
    st.sampled_from(["", ".5", ".123"]),
    st.one_of(st.just(""), _EXPONENT),
)
# JSON text as anyone may send it: numbers with and without exponents anywhere, whitespace
# around them, and strings full of digits and e's (ids, keys) that are not numbers.
_JSON_TEXT = st.recursive(
    st.one_of(_NUMBER, st.just(f'"{RUN}"'), st.just('"1e999 in a string"')),
    lambda inner: st.one_of(
        st.lists(st.tuples(_WS, inner, _WS), max_size=3).map(
            lambda items: "[" + ",".join(a + v + b for a, v, b in items) + "]"
        ),
        st.lists(st.tuples(st.sampled_from(["a", "e1", "9e9"]), _WS, inner), max_size=3).map(
            lambda items: "{" + ",".join(f'"{k}":{w}{v}' for k, w, v in items) + "}"
        ),
    ),
    max_leaves=6,
)


def _has_non_finite(value: object) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(_has_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    return False


@given(_JSON_TEXT, _WS, _WS)
def test_every_number_that_is_not_finite_is_looked_for(text: str, before: str, after: str) -> None:
    raw = f'{before}{{"n":{text}}}{after}'.encode()
    if _has_non_finite(json.loads(raw)):
        assert _MAYBE_NON_FINITE.search(raw), raw


def test_ids_and_plain_numbers_are_not_looked_at() -> None:
    result = {"task_id": f"{RUN}:write:1", "run_id": str(RUN), "n": 1.5, "m": [2, -3.25]}
    assert _MAYBE_NON_FINITE.search(json.dumps(result).encode()) is None
    for raw in (b'{"n": 1e999}', b'{"n":[1, -2.5E+400]}', b'{"n":\n NaN}', b'{"n":-Infinity}'):
        assert _MAYBE_NON_FINITE.search(raw), raw


async def test_a_source_is_subject_tokens_without_wildcards() -> None:
    for source in ("agent.>", "*", "coordinator.", "a b", ""):
        with pytest.raises(ValueError, match="is not a dead-letter source"):
            await read_dead_letters(None, source=source)  # type: ignore[arg-type]
