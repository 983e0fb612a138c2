"""Pydantic's validation errors as short lines a person can act on: `where: what is wrong`.

One core for every place cairn reports a value that does not validate: a dead letter's reason
and a refused command's (`validation_reason`), an agent's input or output error, a workflow
file's problems, the errors a `ContractViolated` event records, the HTTP API's 422 answers.
Each caller keeps its own words around the lines.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from cairn.events.wire import PROTOCOL_VERSION

__all__ = ["error_lines", "error_location", "validation_reason"]


def error_location(
    loc: Iterable[int | str],
    root: str = "(root)",
    *,
    skip: Collection[int | str] = (),
    name_members: bool = False,
) -> str:
    """The dotted path to the value an error is about (`steps.0.name`); `root` for the whole
    value. Parts in `skip` (e.g. FastAPI's `body`) are left out. With `name_members`, a union
    member that pydantic names by its validator (`function-after[check(), Spec]`) is named by
    its model (`Spec`)."""
    parts = [
        str(p).rpartition(", ")[2].rstrip("]")
        if name_members and isinstance(p, str) and p.endswith("]")
        else str(p)
        for p in loc
        if p not in skip
    ]
    return ".".join(parts) or root


def error_lines(
    errors: ValidationError | Sequence[Mapping[str, Any]],
    *,
    root: str = "(root)",
    limit: int | None = None,
    skip: Collection[int | str] = (),
    name_members: bool = False,
) -> list[str]:
    """Each error (at most `limit`) as `where: message`, where is `error_location`'s path.

    Takes a `ValidationError` or its `errors()` (or FastAPI's, which have the same shape).
    How many were left out is for the caller to say: it knows how many there are."""
    found = errors.errors(include_url=False) if isinstance(errors, ValidationError) else errors
    return [
        f"{error_location(e.get('loc', ()), root, skip=skip, name_members=name_members)}: "
        f"{e.get('msg', 'invalid')}"
        for e in found[:limit]
    ]


def validation_reason(exc: ValidationError, what: str, limit: int = 3) -> str:
    """One sentence out of a pydantic error about a message (`what`): what was wrong and where,
    for dead letters, refused commands and refused overrides alike."""
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
    parts = error_lines(errors, limit=limit, name_members=True)
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return f"{what} has the wrong shape: {'; '.join(parts)}{more}"


def problem_line(exc: Exception, limit: int = 3) -> str:
    """What is wrong, on one line: a pydantic error's first `limit` errors as `where: message`
    (and how many more), anything else as its own words."""
    if not isinstance(exc, ValidationError):
        return " ".join(str(exc).split())
    errors = exc.errors(include_url=False)
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(error_lines(errors, limit=limit)) + more


def _excerpt(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"
