"""What `cairn bench` (and `python -m cairn.benchmarks`) does: measure in a scratch folder
under the data directory, then keep the report as `<timestamp>.json` and `.md`."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from rich.table import Table
from rich.text import Text

from cairn.benchmarks.report import Report, format_target, format_value, write_report
from cairn.benchmarks.suite import FULL, QUICK, run_bench


def measure(
    home: Path,
    *,
    quick: bool,
    out: Path,
    keep: bool,
    progress: Callable[[str], None],
) -> tuple[Report, list[Path]]:
    """Run the bench (its own nats-server, coordinator and echo agents in a scratch folder,
    removed afterwards unless `keep`); return the report and the files it was written to."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    workdir = home / f"bench-{stamp}"
    scale = QUICK if quick else FULL
    progress(f"cairn bench ({scale.name}) in {workdir}")
    try:
        report = run_bench(workdir, scale, progress=lambda m: progress(f"  {m}"))
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    json_path, md_path = write_report(report, out)
    return report, [json_path, md_path]


def table(report: Report) -> Table:
    """The report as one table, targets coloured by whether they were met."""
    m = report.machine
    out = Table(
        title=f"cairn bench · {report.commit or 'unknown commit'} · {report.scale} · "
        f"{report.seconds:.0f} s",
        caption=f"{m.get('nproc')} × {m.get('cpu')}, {m.get('ram_gib')} GiB RAM; "
        f"load {m.get('load_start')} → {m.get('load_end')}",
    )
    for column in ("section", "measure", "value", "target", "note"):
        out.add_column(column, overflow="fold")
    for r in report.rows:
        style = {True: "green", False: "red", None: ""}[r.met]
        # Cells are text, not markup: a note such as "pip install 'cairn[bench]'" stays whole.
        out.add_row(
            Text(r.section), Text(r.measure), Text(format_value(r)),
            Text(format_target(r), style=style), Text(r.note),
        )  # fmt: skip
    return out
