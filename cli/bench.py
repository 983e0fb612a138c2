"""`cairn bench`: one table of what cairn costs and how much work it gets through, measured on
this machine now, kept as `<timestamp>.json` and `.md` so results can be compared across commits.
The benchmark itself (`cairn.benchmarks`, with the `bench` extra's peers) loads only here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cairn.cli.app import HomeOpt, JsonOpt, app, console, err_console, print_json, settings_for


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
    from cairn.benchmarks.command import measure, table

    settings = settings_for(home)
    report, files = measure(
        settings.home,
        quick=quick,
        out=out,
        keep=keep,
        progress=lambda m: err_console.print(m, style="dim", highlight=False),
    )
    if as_json:
        print_json({**report.to_json(), "files": [str(f) for f in files]})
        return
    console.print(table(report))
    console.print(f"written to {files[0]} and {files[1]}", highlight=False)
