"""A test agent process: one of the example agents, slowed down, writing down each task it starts.

Run as `python -m slow_agent` with `tests/` on PYTHONPATH (see `chaos.slow_agent_env`):

- `CAIRN_SLOW_AGENT`: which example agent to serve (planner, researcher, writer, reviewer).
- `CAIRN_SLOW_DELAY`: seconds to wait before the real work. Each task waits between half of it
  and all of it, chosen by a hash of the task id and delivery, so a seeded test sees the same
  delays again.
- `CAIRN_SLOW_MARKS`: a folder; as a task starts, a small JSON file there says which process
  holds which task (pid, agent id, task id, step, attempt, delivery), so a test can kill the
  process that holds a given task.

Everything else (NATS, ack wait, concurrency, the offline model) is the real worker runtime.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cairn.agents import Agent, TaskContext, example_agent, main

_counter = itertools.count()


def task_delay(base: float, task_id: str, delivery: int) -> float:
    digest = hashlib.sha256(f"{task_id}#{delivery}".encode()).digest()
    return base * (0.5 + 0.5 * digest[0] / 255)


def write_mark(folder: Path, ctx: TaskContext) -> None:
    """Record that this process started `ctx`'s task (written whole, then renamed into place)."""
    mark = {
        "pid": os.getpid(),
        "agent_id": ctx.agent_id,
        "task_id": ctx.task_id,
        "step": ctx.step,
        "attempt": ctx.attempt,
        "delivery": ctx.delivery,
        "at": time.time(),
    }
    name = f"{os.getpid()}-{next(_counter)}"
    tmp = folder / f".{name}.tmp"
    tmp.write_text(json.dumps(mark))
    tmp.replace(folder / f"{name}.json")


def slowed(name: str, base: float, marks: Path | None) -> Agent[Any, Any]:
    inner = example_agent(name)

    class Slow(type(inner)):  # type: ignore[misc]  # the example agent's own class
        async def handle(self, task: BaseModel, ctx: TaskContext) -> BaseModel:
            if marks is not None:
                write_mark(marks, ctx)
            await asyncio.sleep(task_delay(base, ctx.task_id, ctx.delivery))
            out: BaseModel = await super().handle(task, ctx)
            return out

    Slow.__name__ = Slow.__qualname__ = f"Slow{type(inner).__name__}"
    agent: Agent[Any, Any] = Slow()
    return agent


def factory() -> Agent[Any, Any]:
    marks = os.environ.get("CAIRN_SLOW_MARKS")
    return slowed(
        os.environ["CAIRN_SLOW_AGENT"],
        float(os.environ.get("CAIRN_SLOW_DELAY", "1")),
        Path(marks) if marks else None,
    )


if __name__ == "__main__":
    main(factory)
