"""`cairn bench`: one table of what cairn costs and how much work it gets through, measured on
this machine now, kept as `<timestamp>.json` and `.md` so results can be compared across commits."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .bench import FULL, QUICK, run_bench
from .bench_report import Report, format_target, format_value, write_report
from .cli import HomeOpt, JsonOpt, app, console, err_console, print_json, settings_for


@app.command()
def bench(
    quick: Annotated[
        bool, typer.Option("--quick", help="A small run for a smoke test (well under a minute).")
    ] = False,
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write <timestamp>.json and .md into.")
    ] = Path("bench-results"),
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the scratch folder: logs, stores, views.")
    ] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure per-step overhead, throughput, log work and memory next to this machine's
    limits and two peers; print one table and write it to --out.

    Runs its own nats-server, coordinator and echo agents in a scratch folder under the data
    directory (removed afterwards unless --keep); a running cairn is not touched. The full run
    takes a few minutes. Targets are shown beside the figures and never fail the command."""
    settings = settings_for(home)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    workdir = settings.home / f"bench-{stamp}"
    scale = QUICK if quick else FULL
    err_console.print(f"cairn bench ({scale.name}) in {workdir}", highlight=False)
    try:
        report = run_bench(
            workdir, scale, progress=lambda m: err_console.print(f"  {m}", style="dim")
        )
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    json_path, md_path = write_report(report, out)
    if as_json:
        print_json({**report.to_json(), "files": [str(json_path), str(md_path)]})
        return
    console.print(_table(report))
    console.print(f"written to {json_path} and {md_path}", highlight=False)


def _table(report: Report) -> Table:
    m = report.machine
    table = Table(
        title=f"cairn bench · {report.commit or 'unknown commit'} · {report.scale} · "
        f"{report.seconds:.0f} s",
        caption=f"{m.get('nproc')} × {m.get('cpu')}, {m.get('ram_gib')} GiB RAM; "
        f"load {m.get('load_start')} → {m.get('load_end')}",
    )
    for column in ("section", "measure", "value", "target", "note"):
        table.add_column(column, overflow="fold")
    for r in report.rows:
        style = {True: "green", False: "red", None: ""}[r.met]
        table.add_row(
            r.section, r.measure, format_value(r), f"[{style}]{format_target(r)}[/]"
            if style else format_target(r), r.note,
        )  # fmt: skip
    return table
