"""The example agents by name, for `cairn agent NAME`."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from cairn.agents.base import Agent
from cairn.agents.process import main


class UnknownAgentError(LookupError):
    """No example agent has the name asked for."""


def _lazy(module: str, name: str) -> Callable[[], Agent[Any, Any]]:
    # Imported on call: `python -m cairn.agents.examples.planner` must not find its own module
    # already imported by the package (runpy warns about that).
    def factory() -> Agent[Any, Any]:
        cls = getattr(importlib.import_module(f"cairn.agents.examples.{module}"), name)
        agent: Agent[Any, Any] = cls()
        return agent

    factory.__name__ = name
    factory.__qualname__ = name
    return factory


EXAMPLE_AGENTS: dict[str, Callable[[], Agent[Any, Any]]] = {
    "planner": _lazy("planner", "Planner"),
    "researcher": _lazy("researcher", "Researcher"),
    "writer": _lazy("writer", "Writer"),
    "reviewer": _lazy("reviewer", "Reviewer"),
}


def example_agent(name: str) -> Agent[Any, Any]:
    """A fresh instance of the example agent `name`."""
    try:
        factory = EXAMPLE_AGENTS[name]
    except KeyError:
        known = ", ".join(sorted(EXAMPLE_AGENTS))
        raise UnknownAgentError(f"unknown agent {name!r} (known: {known})") from None
    return factory()


def run_agent_process(name: str) -> NoReturn:
    """Run the example agent `name` as this process (what `cairn agent NAME` does)."""
    if name not in EXAMPLE_AGENTS:
        known = ", ".join(sorted(EXAMPLE_AGENTS))
        sys.stderr.write(f"cairn agent: unknown agent {name!r} (known: {known})\n")
        raise SystemExit(2)
    main(EXAMPLE_AGENTS[name])
