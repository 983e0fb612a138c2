"""An agent as a process of its own: the body of an agent module's `__main__` (`main`)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from cairn.agents.base import Agent, check_agent
from cairn.agents.errors import AgentConfigError
from cairn.agents.llm import ClosableLLMClient, LLMClient, LLMConfigError, llm_from_settings
from cairn.agents.worker import WorkerOptions, new_agent_id, run_worker
from cairn.runtime import tracing
from cairn.runtime.connection import NatsUnavailableError, display_url
from cairn.runtime.settings import Settings, SettingsError

# The worker runtime logs under one name, whichever of its modules speaks.
log = logging.getLogger("cairn.agents.worker")


def main(
    agent_factory: Callable[[], Agent[Any, Any]], *, settings: Settings | None = None
) -> NoReturn:
    """Run one agent as a process: the body of an agent module's `__main__`.

    Settings default to `Settings.from_env()`: NATS from `NATS_URL` (or the embedded server
    that `cairn up` started), connecting as the user `agent-<capability>`; worker options from
    `CAIRN_AGENT_*`, the model from `CAIRN_LLM*`, the log level from `CAIRN_LOG_LEVEL`.
    SIGTERM and SIGINT stop it gracefully (exit 0). While NATS cannot be reached it waits, with
    one line saying so, up to `CAIRN_START_TIMEOUT` (default 120 s; 0: no limit). A server
    still unreachable then, credentials it refuses, or wrong configuration, is one line on
    stderr and exit status 2.
    """
    try:
        settings = settings or Settings.from_env()
        _configure_logging(settings.log_level)
        agent = agent_factory()
        check_agent(agent)
        options = WorkerOptions.from_settings(settings)
        llm = llm_from_settings(settings)
        tracing.setup(f"cairn-agent-{agent.capability}")
    except (
        SettingsError,
        AgentConfigError,
        LLMConfigError,
        TypeError,
        tracing.TracingConfigError,
    ) as exc:
        sys.stderr.write(f"cairn agent: {exc}\n")
        raise SystemExit(2) from None
    try:
        code = asyncio.run(_serve(agent, settings, llm, options))
    finally:
        tracing.shutdown()  # what is still buffered goes out before the process ends
    raise SystemExit(code)


async def _serve(
    agent: Agent[Any, Any], settings: Settings, llm: LLMClient, options: WorkerOptions
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    url = display_url(settings.resolved_nats_url())
    agent_id = new_agent_id(agent.capability)
    log.info(
        "starting agent %s (%s): NATS %s, LLM %s, concurrency %d, ack_wait %gs, max_deliver %d",
        agent.capability,
        agent_id,
        url or "(not configured)",
        getattr(llm, "model", type(llm).__name__),
        options.concurrency,
        options.ack_wait,
        options.max_deliver,
    )
    try:
        await run_worker(
            agent,
            settings,
            concurrency=options.concurrency,
            ack_wait=options.ack_wait,
            max_deliver=options.max_deliver,
            shutdown_grace=options.shutdown_grace,
            stop=stop,
            llm=llm,
            agent_id=agent_id,
        )
    except (NatsUnavailableError, AgentConfigError) as exc:
        sys.stderr.write(f"cairn agent {agent.capability}: {exc}\n")
        return 2
    finally:
        if isinstance(llm, ClosableLLMClient):
            await llm.aclose()
    if not stop.is_set():
        log.error("agent %s stopped: the NATS connection was closed", agent_id)
        return 1
    log.info("agent %s stopped", agent_id)
    return 0


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
