"""The reviewer: scores a draft against the run's success criteria (Review@1).

The score is computed from the draft alone, so the same draft always gets the same score;
the model only adds an editor's note. Run it as its own process:
`python -m cairn.agents.examples.reviewer`.
"""

from __future__ import annotations

from pydantic import Field

from cairn.agents.base import Agent, TaskContext
from cairn.agents.examples.contracts import Draft, Review, draft_word_count
from cairn.agents.process import main as serve
from cairn.agents.text import keywords, with_repair
from cairn.events import Frozen

APPROVAL_SCORE = 0.7
MIN_SECTIONS = 3
MIN_WORDS = 150
ANSWER_WORDS = 20  # what a section needs to count as an answer to its question
SYSTEM = "You are an editor. Give one sentence of constructive feedback on the report."


class ReviewRequest(Frozen):
    """The draft to review and the run's success criteria."""

    draft: Draft
    success_criteria: list[str] = Field(default_factory=list)


class Reviewer(Agent[ReviewRequest, Review]):
    """Reviews a draft: structure, length, an honest word count and the success criteria."""

    capability = "reviewer"

    async def handle(self, task: ReviewRequest, ctx: TaskContext) -> Review:
        score, comments = assess(task.draft, task.success_criteria)
        headings = "\n".join(s.heading for s in task.draft.sections)
        note = await ctx.llm.complete(
            with_repair(SYSTEM, ctx.repair),
            f"Title: {task.draft.title}\nSections:\n{headings}",
            max_tokens=80,
        )
        if note.text.strip():
            comments.append(f"Editor's note: {note.text.strip()}")
        return Review(approved=score >= APPROVAL_SCORE, score=score, comments=comments)


def assess(draft: Draft, criteria: list[str]) -> tuple[float, list[str]]:
    """Score a draft in [0, 1] and say what cost it points."""
    comments: list[str] = []
    sections = len(draft.sections)
    structure = min(sections / MIN_SECTIONS, 1.0)
    if sections < MIN_SECTIONS:
        comments.append(f"Only {sections} section(s); a report needs at least {MIN_SECTIONS}.")
    words = draft_word_count(draft.sections)
    length = min(words / MIN_WORDS, 1.0)
    if words < MIN_WORDS:
        comments.append(f"{words} words is short; aim for at least {MIN_WORDS}.")
    honest = 1.0 if draft.word_count == words else 0.0
    if not honest:
        comments.append(f"The draft claims {draft.word_count} words but has {words}.")
    text = " ".join([draft.title, *(f"{s.heading} {s.body}" for s in draft.sections)]).lower()
    met = [c for c in criteria if _criterion_met(c, text, draft)]
    coverage = len(met) / len(criteria) if criteria else 1.0
    comments.extend(f"Not clearly addressed: {c}" for c in criteria if c not in met)
    score = 0.25 * structure + 0.25 * length + 0.2 * honest + 0.3 * coverage
    return round(score, 2), comments


def _criterion_met(criterion: str, text: str, draft: Draft) -> bool:
    # A criterion about the questions is met when every section (one per question) answers
    # in a few sentences; any other counts as addressed when at least half of its key words
    # occur in the draft.
    if "question" in criterion.lower():
        return all(len(s.body.split()) >= ANSWER_WORDS for s in draft.sections)
    words = keywords(criterion, min_length=4)
    return not words or sum(w in text for w in words) * 2 >= len(words)


def main() -> None:
    """Serve the reviewer until SIGTERM."""
    serve(Reviewer)


if __name__ == "__main__":
    main()
