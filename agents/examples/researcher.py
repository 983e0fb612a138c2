"""The researcher: answers each question of a plan (Research@1).

Run it as its own process: `python -m cairn.agents.examples.researcher`.
"""

from __future__ import annotations

import asyncio

from pydantic import Field

from cairn.agents.base import Agent, TaskContext
from cairn.agents.examples.contracts import Finding, Research, count_words
from cairn.agents.process import main as serve
from cairn.agents.text import with_repair
from cairn.events import Frozen

SYSTEM = (
    "You are a careful researcher. Answer the question about the topic in two or three plain, "
    "factual sentences, and say so when the answer is uncertain."
)


class ResearchRequest(Frozen):
    """The topic and the plan's questions."""

    topic: str = Field(min_length=1)
    questions: list[str] = Field(min_length=1, max_length=12)


class Researcher(Agent[ResearchRequest, Research]):
    """Researches a topic: one finding per question, each answered by the model."""

    capability = "researcher"

    async def handle(self, task: ResearchRequest, ctx: TaskContext) -> Research:
        system = with_repair(SYSTEM, ctx.repair)
        completions = await asyncio.gather(
            *(
                ctx.llm.complete(system, f"Topic: {task.topic}\nQuestion: {q}", max_tokens=200)
                for q in task.questions
            )
        )
        findings = []
        for question, completion in zip(task.questions, completions, strict=True):
            answer = completion.text.strip() or "No answer was found for this question."
            findings.append(
                Finding(question=question, answer=answer, confidence=confidence(answer))
            )
        return Research(findings=findings)


def confidence(answer: str) -> float:
    """A deterministic stand-in for confidence: fuller answers score higher, hedges lower."""
    score = 0.4 + 0.01 * count_words(answer)
    if any(hedge in answer.lower() for hedge in ("uncertain", "unclear", "not known")):
        score -= 0.2
    return round(min(max(score, 0.1), 0.9), 2)


def main() -> None:
    """Serve the researcher until SIGTERM."""
    serve(Researcher)


if __name__ == "__main__":
    main()
