"""The planner: turns a goal and a topic into a report plan (Plan@1).

Run it as its own process: `python -m cairn.agents.examples.planner`.
"""

from __future__ import annotations

import hashlib

from pydantic import Field

from cairn.agents.base import Agent, TaskContext
from cairn.agents.examples.contracts import Plan
from cairn.agents.process import main as serve
from cairn.agents.text import parse_questions, with_repair
from cairn.events import Frozen

DEFAULT_AUDIENCE = "general readers"
SYSTEM = (
    "You plan short research reports. Reply with 3 to 5 research questions about the topic, "
    "one per line, each ending with a question mark, that together serve the goal and suit "
    "the audience."
)


class PlanRequest(Frozen):
    """What the planner needs: the run's goal, the topic, and optionally who will read it."""

    goal: str = Field(min_length=1)
    topic: str = Field(min_length=1)
    audience: str | None = None


class Planner(Agent[PlanRequest, Plan]):
    """Plans a report: a title, its audience and 3–5 research questions."""

    capability = "planner"

    async def handle(self, task: PlanRequest, ctx: TaskContext) -> Plan:
        audience = (task.audience or "").strip() or DEFAULT_AUDIENCE
        completion = await ctx.llm.complete(
            with_repair(SYSTEM, ctx.repair),
            f"Goal: {task.goal}\nTopic: {task.topic}\nAudience: {audience}",
            max_tokens=300,
        )
        questions = parse_questions(completion.text, limit=5)
        if len(questions) < 3:
            # No usable list (the offline model writes prose): plan from templates instead.
            questions = template_questions(task.topic, task.goal, audience)
        topic = task.topic.strip()
        title = f"{topic[:1].upper()}{topic[1:]}: a short report"[:120]
        return Plan(title=title, audience=audience, questions=questions)


_TEMPLATES = (
    "What is {topic}, and why does it matter to {audience}?",
    "What are the main approaches to {topic} today?",
    "What evidence shows how {topic} works in practice?",
    "What risks, limits or open problems does {topic} face?",
)


def template_questions(topic: str, goal: str, audience: str) -> list[str]:
    """3–5 questions from templates; how many depends on a hash of the topic and goal."""
    topic = topic.strip()
    count = 3 + hashlib.sha256(f"{topic}\x00{goal}".encode()).digest()[0] % 3
    questions = [t.format(topic=topic, audience=audience) for t in _TEMPLATES[: count - 1]]
    questions.append(f"How does {topic} bear on the goal: {goal.strip().rstrip('.?!')[:200]}?")
    return questions


def main() -> None:
    """Serve the planner until SIGTERM."""
    serve(Planner)


if __name__ == "__main__":
    main()
