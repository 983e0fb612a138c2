"""The echo agent: returns its input as its output, at once. No model, no usage, no cost.

It is what `cairn bench` runs to measure what cairn itself costs per step: everything a real
agent goes through (the shared consumer, envelope and input validation, the result published
and confirmed before the ack) with nothing of its own added. Run it as its own process:
`python -m cairn.agents.examples.echo` (capability `echo`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from cairn.agents.base import Agent, TaskContext
from cairn.agents.process import main as serve


class Payload(BaseModel):
    """Any JSON object; echoed unchanged."""

    model_config = ConfigDict(extra="allow", frozen=True)


class Echo(Agent[Payload, Payload]):
    """Answers every task with its own input."""

    capability = "echo"

    async def handle(self, task: Payload, ctx: TaskContext) -> Payload:
        return task


def main() -> None:
    """Serve the echo agent until SIGTERM."""
    serve(Echo)


if __name__ == "__main__":
    main()
