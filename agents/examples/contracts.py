"""Output contracts of the example agents (planner → researcher → writer → reviewer), and the
input the example workflows take (`ReportInput`)."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

from cairn.events.contracts import contract


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid")


@contract("ReportInput", 1)
class ReportInput(_Contract):
    """The input of the example workflows (research-report, reviewed-report): checked before a
    run starts, so a missing topic is refused at the door instead of failing the first step."""

    topic: str = Field(min_length=1, max_length=500)
    audience: str | None = Field(default=None, min_length=1, max_length=200)
    # Taken as the run's goal when the start gives no intent.
    goal: str | None = Field(default=None, min_length=1, max_length=2000)


@contract("Plan", 1)
class Plan(_Contract):
    title: str = Field(min_length=1)
    audience: str
    questions: list[str] = Field(min_length=1, max_length=12)


class Finding(_Contract):
    question: str
    answer: str = Field(min_length=1)
    confidence: float = Field(ge=0, le=1)


@contract("Research", 1)
class Research(_Contract):
    findings: list[Finding] = Field(min_length=1)


class Section(_Contract):
    heading: str
    body: str = Field(min_length=1)


@contract("Draft", 1)
class Draft(_Contract):
    title: str
    sections: list[Section] = Field(min_length=1)
    # Words in all section headings and bodies: see `draft_word_count`.
    word_count: int = Field(ge=0)


@contract("Review", 1)
class Review(_Contract):
    approved: bool
    score: float = Field(ge=0, le=1)
    comments: list[str] = Field(default_factory=list)


def count_words(text: str) -> int:
    """Words as a reader counts them: runs of non-space characters."""
    return len(text.split())


def draft_word_count(sections: Iterable[Section]) -> int:
    """What `Draft.word_count` must say: the words of every section's heading and body."""
    return sum(count_words(s.heading) + count_words(s.body) for s in sections)
