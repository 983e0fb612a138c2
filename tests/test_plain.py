"""Words from the record printed as text: no markup, no codes that steer a terminal."""

from __future__ import annotations

from rich.console import Console

from cairn.cli.plain import clean, plain


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
