"""Wording a message that does not fit the contract: one sentence out of a pydantic error, for
dead letters and for refused commands alike."""

from __future__ import annotations

from pydantic import ValidationError

from cairn.events.wire import PROTOCOL_VERSION


def validation_reason(exc: ValidationError, what: str, limit: int = 3) -> str:
    """One sentence out of a pydantic error: what was wrong and where."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"{what} is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}"
    if first["type"] == "literal_error" and first["loc"] == ("v",):
        return (
            f"{what} has an unsupported protocol version v={_excerpt(first['input'])} "
            f"(this coordinator speaks v={PROTOCOL_VERSION})"
        )
    # Several errors, because the first alone can mislead: for a field that takes a name or an
    # inline definition (`workflow`), it says only that the value is not a string.
    parts = [f"{_where(e['loc'])}: {e['msg']}" for e in errors[:limit]]
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return f"{what} has the wrong shape: {'; '.join(parts)}{more}"


def _where(loc: tuple[int | str, ...]) -> str:
    """A dotted path; a union member named by its validator (`function-after[check(), Spec]`)
    is named by its model (`Spec`)."""
    parts = [
        str(p).rpartition(", ")[2].rstrip("]") if isinstance(p, str) and p.endswith("]") else str(p)
        for p in loc
    ]
    return ".".join(parts) or "(root)"


def _excerpt(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"
