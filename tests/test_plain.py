"""Words from the record printed as text: no markup, no codes that steer a terminal."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime

import pytest
from rich.console import Console

from cairn.cli.plain import clean, plain, spreadsheet_safe


def test_steering_characters_are_shown_as_their_codes() -> None:
    assert clean("a\x1b[2Jb\rc\x07d\x9be\u202ef\u2066g") == (
        "a\\x1b[2Jb\\x0dc\\x07d\\x9be\\u202ef\\u2066g"
    )
    assert clean("tab\there\nnew line, ünïcødé, 漢字, emoji 🙂") == (
        "tab\there\nnew line, ünïcødé, 漢字, emoji 🙂"
    )


def test_a_cell_is_printed_as_written() -> None:
    console = Console(force_terminal=True, width=200, record=True)
    console.print(plain("[red]boom[/] \x1b[31mred"))
    console.print(plain(None))
    text = console.export_text()
    assert "[red]boom[/] \\x1b[31mred" in text


def test_a_csv_cell_never_starts_a_formula(capsys: pytest.CaptureFixture[str]) -> None:
    from cairn.cli.audit import _write_csv
    from cairn.projections import AuditRow

    assert spreadsheet_safe('=HYPERLINK("http://x","y")') == '\'=HYPERLINK("http://x","y")'
    for start in "=+-@\t\r":
        assert spreadsheet_safe(f"{start}1").startswith("'")
    assert spreadsheet_safe("plain words") == "plain words"
    row = AuditRow(
        position=7, run_id=uuid.UUID(int=1), seq=3, at=datetime(2026, 1, 1, tzinfo=UTC),
        actor="agent:writer", action="TaskFailed", step="write",
        reason="=cmd|' /C calc'!A0", detail="+1 more", trace_id=None,
    )  # fmt: skip
    _write_csv([row])
    [header, cells] = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    written = dict(zip(header, cells, strict=True))
    assert written["reason"] == "'=cmd|' /C calc'!A0"
    assert written["detail"] == "'+1 more"
    assert written["position"] == "7"
