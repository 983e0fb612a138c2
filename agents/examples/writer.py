"""The writer: turns findings into a draft report (Draft@1).

Run it as its own process: `python -m cairn.agents.examples.writer`.
"""

from __future__ import annotations

import asyncio

from pydantic import Field

from cairn.agents.base import Agent, TaskContext
from cairn.agents.examples.contracts import Draft, Finding, Section, draft_word_count
from cairn.agents.process import main as serve
from cairn.agents.text import with_repair
from cairn.events import Frozen

SYSTEM = (
    "You write clear reports for {audience}. Turn the finding into one readable paragraph "
    "that answers the question. Use only the facts given."
)


class WriteRequest(Frozen):
    """The plan's title and audience, and the research findings."""

    title: str = Field(min_length=1)
    audience: str
    findings: list[Finding] = Field(min_length=1)


class Writer(Agent[WriteRequest, Draft]):
    """Writes a draft: one section per finding, with a true word count."""

    capability = "writer"

    async def handle(self, task: WriteRequest, ctx: TaskContext) -> Draft:
        system = with_repair(SYSTEM.format(audience=task.audience), ctx.repair)
        completions = await asyncio.gather(
            *(
                ctx.llm.complete(
                    system, f"Question: {f.question}\nFinding: {f.answer}", max_tokens=250
                )
                for f in task.findings
            )
        )
        sections = [
            Section(heading=f.question, body=c.text.strip() or f.answer)
            for f, c in zip(task.findings, completions, strict=True)
        ]
        return Draft(title=task.title, sections=sections, word_count=draft_word_count(sections))


def main() -> None:
    """Serve the writer until SIGTERM."""
    serve(Writer)


if __name__ == "__main__":
    main()
