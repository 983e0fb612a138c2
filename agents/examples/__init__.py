"""The example agents (planner, researcher, writer, reviewer, and the no-op echo), their output
contracts, and the registry `cairn agent NAME` runs them from. Each is a process of its own:
`python -m cairn.agents.examples.planner`."""

from cairn.agents.examples.registry import (
    EXAMPLE_AGENTS,
    UnknownAgentError,
    example_agent,
    run_agent_process,
)

__all__ = ["EXAMPLE_AGENTS", "UnknownAgentError", "example_agent", "run_agent_process"]
