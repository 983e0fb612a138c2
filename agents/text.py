"""Small text helpers for agents: key words (the offline model uses them), question lists, repair
notes."""

from __future__ import annotations

import re
from collections.abc import Iterable

WORD = re.compile(r"[A-Za-z][A-Za-z0-9'-]*")
STOPWORDS = frozenset(
    """a about above after again all also an and any are as at be because been before being
    between both but by can could did do does doing down during each few for from further had
    has have having he her here hers him his how i if in into is it its itself just me more
    most my no nor not now of off on once only or other our out over own same she should so
    some such than that the their them then there these they this those through to too under
    until up very was we were what when where which while who whom why will with would you
    your answer question questions topic goal audience write sentence sentences short finding
    findings title section sections explain describe""".split()  # noqa: SIM905
)
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)]|Q\d+[:.)])\s*")


def keywords(text: str, *, min_length: int = 3) -> list[str]:
    """The distinct non-trivial words of `text`, lower-cased, in order of first use."""
    found: list[str] = []
    for word in WORD.findall(text):
        low = word.lower()
        if len(low) >= min_length and low not in STOPWORDS and low not in found:
            found.append(low)
    return found


def parse_questions(text: str, *, limit: int) -> list[str]:
    """Lines of `text` that are questions (bullets and numbering removed), at most `limit`."""
    questions: list[str] = []
    for line in text.splitlines():
        question = _BULLET.sub("", line).strip().strip('"')
        if question.endswith("?") and len(question) > 3 and question not in questions:
            questions.append(question)
    return questions[:limit]


def with_repair(system: str, repair: Iterable[str]) -> str:
    """The system prompt, extended with why the previous attempt's output was rejected."""
    problems = [p for p in repair if p]
    if not problems:
        return system
    return (
        f"{system}\n\nYour previous answer was rejected because: {'; '.join(problems)}. "
        "Correct these problems in this answer."
    )
