"""The limits of what cairn takes from outside, written once: token counts, amounts, names,
texts, list lengths and how deeply JSON may nest. Every wire message (results, commands) is
built from these types, so a value past a limit is refused at the door with one sentence that
names the field and the limit (the dead letter's or the reply's reason), and nothing past it is
ever recorded, charged or shown.

Stored events keep accepting what earlier versions recorded: a history is read back as written.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from cairn.events.run import Budget, Intent, Usage

# A trillion tokens in one usage record, a hundred records in one result: far past any model,
# and every sum of them still fits a 64-bit column.
MAX_TOKENS = 10**12
MAX_USAGE_RECORDS = 100
# Budgets: a billion dollars, to the millionth of a cent; a budget of tokens as large as the
# tokens of every usage record of a long run.
MAX_USD = Decimal(10**9)
MAX_BUDGET_TOKENS = 10**15
MAX_NAME = 200  # step, agent, model, person and workflow names
MAX_TEXT = 10_000  # error messages, reviews, reasons, goals
MAX_ITEMS = 1_000  # constraints, success criteria
MAX_DEPTH = 64  # nesting of JSON objects and arrays in inputs and outputs
MAX_ATTEMPT = 10_000

TokenCount = Annotated[int, Field(ge=0, le=MAX_TOKENS)]
BudgetTokens = Annotated[int, Field(ge=0, le=MAX_BUDGET_TOKENS)]
Amount = Annotated[Decimal, Field(ge=0, le=MAX_USD, decimal_places=12, allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
Attempt = Annotated[int, Field(ge=0, le=MAX_ATTEMPT)]


def _depth(value: Any, limit: int) -> int:
    """How deeply `value` nests (1 for a flat object), counting no further than `limit + 1`."""
    deepest = 0
    todo: list[tuple[Any, int]] = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        if isinstance(item, dict):
            todo.extend((v, depth + 1) for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            todo.extend((v, depth + 1) for v in item if isinstance(v, dict | list))
    return deepest


def _shallow(value: dict[str, Any]) -> dict[str, Any]:
    if _depth(value, MAX_DEPTH) > MAX_DEPTH:
        raise ValueError(f"nests deeper than {MAX_DEPTH} levels")
    return value


def _usage(value: Usage) -> Usage:
    if len(value.model) > MAX_NAME:
        raise ValueError(f"the model name is longer than {MAX_NAME} characters")
    for name in ("input_tokens", "output_tokens"):
        if getattr(value, name) > MAX_TOKENS:
            raise ValueError(f"{name} is over {MAX_TOKENS:,} (a trillion)")
    return value


def _intent(value: Intent) -> Intent:
    if len(value.goal) > MAX_TEXT:
        raise ValueError(f"the goal is longer than {MAX_TEXT} characters")
    for name in ("constraints", "success_criteria"):
        items = getattr(value, name)
        if len(items) > MAX_ITEMS or any(len(i) > MAX_TEXT for i in items):
            raise ValueError(
                f"{name} holds more than {MAX_ITEMS} items or one longer than {MAX_TEXT} characters"
            )
    return value


def _budget(value: Budget) -> Budget:
    if value.usd is not None and (value.usd > MAX_USD or -int(value.usd.as_tuple().exponent) > 12):
        raise ValueError(f"usd must be at most {MAX_USD:,} with at most 12 decimal places")
    if value.tokens is not None and value.tokens > MAX_BUDGET_TOKENS:
        raise ValueError(f"tokens must be at most {MAX_BUDGET_TOKENS:,}")
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_shallow)]
BoundedBudget = Annotated[Budget, AfterValidator(_budget)]
ReportedUsage = Annotated[Usage, AfterValidator(_usage)]
BoundedIntent = Annotated[Intent, AfterValidator(_intent)]
