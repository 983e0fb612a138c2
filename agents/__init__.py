"""cairn's agent SDK: the `Agent` base class, the worker runtime, LLM clients and usage
reporting, plus four example agents (planner, researcher, writer, reviewer), each runnable as
its own process (`python -m cairn.agents.examples.planner`, or `cairn agent planner`).
"""

from cairn.agents.base import Agent, TaskContext
from cairn.agents.errors import AgentConfigError, NonRetryableError
from cairn.agents.examples.registry import (
    EXAMPLE_AGENTS,
    UnknownAgentError,
    example_agent,
    run_agent_process,
)
from cairn.agents.llm import (
    OFFLINE_MODEL,
    ClosableLLMClient,
    Completion,
    LLMClient,
    LLMConfigError,
    LLMError,
    LLMPermanentError,
    OfflineModel,
    OpenAICompatibleClient,
    estimate_tokens,
    llm_from_env,
    llm_from_settings,
)
from cairn.agents.process import main
from cairn.agents.tasks import format_errors
from cairn.agents.worker import (
    WorkerOptions,
    declare_agent_consumer,
    new_agent_id,
    run_worker,
)

__all__ = [
    "EXAMPLE_AGENTS",
    "OFFLINE_MODEL",
    "Agent",
    "AgentConfigError",
    "ClosableLLMClient",
    "Completion",
    "LLMClient",
    "LLMConfigError",
    "LLMError",
    "LLMPermanentError",
    "NonRetryableError",
    "OfflineModel",
    "OpenAICompatibleClient",
    "TaskContext",
    "UnknownAgentError",
    "WorkerOptions",
    "declare_agent_consumer",
    "estimate_tokens",
    "example_agent",
    "format_errors",
    "llm_from_env",
    "llm_from_settings",
    "main",
    "new_agent_id",
    "run_agent_process",
    "run_worker",
]
