"""Words from the record printed safely: what agents, people and other processes wrote (an
error, a reason, a dead letter) reaches the terminal as text, never as markup or as codes that
steer the terminal."""

from __future__ import annotations

import re

from rich.text import Text

# Characters that steer a terminal rather than print: C0 controls but tab and newline (ESC can
# clear or rewrite the screen, CR overwrite a line), DEL, C1 controls, and the bidirectional
# overrides that make text read differently from how it is stored.
_STEERING = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean(text: str) -> str:
    """Text from the record (an agent's error, a reason, a dead letter: anyone's words) made
    safe to print: every character that would steer the terminal is shown as its code
    (`\\x1b`, `\\u202e`) instead."""
    return _STEERING.sub(_shown, text)


def _shown(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def plain(value: object) -> Text:
    """A table cell or line from the record: its words as written, never markup (`[red]`
    stays text) and never a terminal control (see `clean`)."""
    return Text(clean("" if value is None else str(value)))


# What a spreadsheet reads as the start of a formula (and so runs) when a CSV cell begins with it.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: str) -> str:
    """A CSV cell a spreadsheet shows rather than runs: one that begins like a formula
    (`=HYPERLINK(...)` in an agent's error, say) gets a leading `'`, the spreadsheets' own
    mark for text."""
    return f"'{value}" if value.startswith(_FORMULA_START) else value
