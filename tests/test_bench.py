"""`cairn bench`: the table has every row, each with a number or an explained "n/a".

Smoke tests only: no figure is compared with its target (speed depends on the machine).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from cairn.benchmarks.live import LiveFigures
from cairn.benchmarks.logwork import LogFigures
from cairn.benchmarks.report import Row
from cairn.benchmarks.rows import limit_rows, log_rows, memory_rows, peer_rows, step_rows
from cairn.benchmarks.scale import QUICK

SECTIONS = {"limits", "per step", "throughput", "log", "memory", "peers"}
# Rows whose figure does not depend on optional packages or on how fast the machine is.
ALWAYS_MEASURED = (
    "NATS request/reply round trip",
    "JetStream publish with ack",
    "SQLite commit",
    "floor for one step",
    "TaskDispatched → next TaskDispatched",
    "… p99",
    "steps/s",
    "EventStore.append",
    "projection rebuild",
    "coordinator RSS, idle",
)


def assert_explained(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if r["value"] is None:
            assert r["note"].startswith("n/a: "), r
            assert r["note"].removeprefix("n/a: ").strip(), r
            assert r["met"] is None, r
        else:
            assert isinstance(r["value"], int | float), r
            assert math.isfinite(r["value"]), r


def test_quick_bench_prints_and_writes_the_whole_table(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "cairn.cli", "bench", "--quick", "--json",
         "--home", str(tmp_path / "home"), "--out", str(out)],
        capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    rows = report["rows"]
    assert {r["section"] for r in rows} == SECTIONS
    assert_explained(rows)
    for start in ALWAYS_MEASURED:
        matching = [r for r in rows if r["measure"].startswith(start)]
        assert matching, f"no row {start!r}"
        assert all(r["value"] is not None for r in matching), matching
    assert report["machine"]["nproc"]
    assert report["machine"]["cpu"]
    assert report["scale"] == "quick"
    # Both files, with every measure in the Markdown table; the scratch folder is gone.
    json_file, md_file = (Path(p) for p in report["files"])
    assert json.loads(json_file.read_text())["rows"] == rows
    markdown = md_file.read_text()
    assert all(r["measure"] in markdown for r in rows)
    assert not any((tmp_path / "home").glob("bench-*"))


def test_rows_say_why_when_nothing_could_be_measured() -> None:
    live = LiveFigures(errors={"limits": "nats-server: no binary", "services": "no binary"})
    rows: list[Row] = [
        *limit_rows([0.3, 0.4], "FULL", live, None),
        *step_rows(QUICK, live, None),
        *memory_rows(QUICK, live),
        *peer_rows(live, {"langgraph": {"ok": False, "error": "not installed: pip ..."}}),
    ]
    assert_explained([vars(r) for r in rows])
    assert rows[2].value is not None  # the SQLite commits did not need NATS
    assert "no binary" in rows[0].note
    peers = [r for r in rows if r.section == "peers"]
    assert "not installed" in peers[0].note
    assert "not run" in peers[1].note
    log_only = LogFigures(errors={"replay": "ImportError: no replay"})
    assert_explained([vars(r) for r in log_rows(log_only)])
    replay = [r for r in log_rows(log_only) if r.measure == "replay --check"]
    assert replay[0].value is None
    assert "no replay" in replay[0].note


def test_the_printed_table_shows_notes_as_written() -> None:
    from rich.console import Console

    from cairn.benchmarks.command import table
    from cairn.benchmarks.report import Report

    note = "n/a: not installed: pip install 'cairn[bench]' (langgraph, dbos)"
    rows = [
        Row("peers", "LangGraph: step → next step, p50", None, "ms", note=note),
        Row("per step", "p50", 2.0, "ms", target="≤ 1.5 ms", met=False, note="[red]raw[/]"),
    ]
    report = Report("2026-12-08T00:00:00Z", 1.0, "quick", "abc1234", {"nproc": 2}, rows)
    console = Console(width=400, record=True)
    console.print(table(report))
    text = console.export_text()
    assert "pip install 'cairn[bench]' (langgraph, dbos)" in text
    assert "[red]raw[/]" in text
