"""A test agent process for the `scout` capability: it proposes one follow-up step, and asks
for a review when its input says it is unsure. Run as `python -m scout_agent` with `tests/`
on PYTHONPATH."""

from __future__ import annotations

from pydantic import BaseModel

from cairn.agents import Agent, TaskContext, main
from cairn.events import StepSpec


class ScoutInput(BaseModel):
    area: str
    unsure: bool = False


class ScoutReport(BaseModel):
    area: str
    found: int


class Scout(Agent[ScoutInput, ScoutReport]):
    capability = "scout"

    async def handle(self, task: ScoutInput, ctx: TaskContext) -> ScoutReport:
        if ctx.step == "survey":
            ctx.propose(
                StepSpec(name="dig", capability="scout", input={"area": f"under {task.area}"})
            )
        if task.unsure:
            ctx.request_review("the count looks too high")
        return ScoutReport(area=task.area, found=len(task.area))


if __name__ == "__main__":
    main(Scout)
