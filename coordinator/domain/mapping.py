"""Resolving a step's input mapping: pure, over the run's input, intent and earlier outputs.

A mapping value is either a literal or a reference:
`$input.<path>` (the run input), `$intent.<path>` (goal, constraints, success_criteria),
`$steps.<step>.output.<path>` (an earlier step's validated output). `$$` escapes a literal `$`.
`$input.audience ?? general readers` gives a default for a reference that points at nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class ReferenceError_(LookupError):
    """A reference in a step's input mapping points at nothing."""


def references(template: Any) -> Iterator[str]:
    """Every `$reference` in a mapping, without the `$`."""
    for ref, _ in references_with_defaults(template):
        yield ref


def references_with_defaults(template: Any) -> Iterator[tuple[str, bool]]:
    """Every `$reference` in a mapping, without the `$`, and whether a `?? default` makes it
    optional."""
    if isinstance(template, str):
        if template.startswith("$") and not template.startswith("$$"):
            ref, sep, _ = template[1:].partition(" ?? ")
            yield ref.strip(), bool(sep)
    elif isinstance(template, dict):
        for value in template.values():
            yield from references_with_defaults(value)
    elif isinstance(template, list):
        for value in template:
            yield from references_with_defaults(value)


def referenced_steps(template: Any) -> set[str]:
    return {ref.split(".")[1] for ref in references(template) if ref.startswith("steps.")}


def resolve(template: Any, context: dict[str, Any]) -> Any:
    """Replace references in a mapping by the values they point at."""
    if isinstance(template, str):
        if template.startswith("$$"):
            return template[1:]
        if template.startswith("$"):
            ref, sep, default = template[1:].partition(" ?? ")
            try:
                return lookup(context, ref.strip())
            except ReferenceError_:
                if sep:
                    return default
                raise
        return template
    if isinstance(template, dict):
        return {key: resolve(value, context) for key, value in template.items()}
    if isinstance(template, list):
        return [resolve(value, context) for value in template]
    return template


def lookup(context: dict[str, Any], ref: str) -> Any:
    value: Any = context
    walked: list[str] = []
    for part in ref.split("."):
        walked.append(part)
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise ReferenceError_(f"${ref}: nothing at {'.'.join(walked)}")
    return value
