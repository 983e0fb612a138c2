"""`cairn dead-letters`: what cairn refused to process, and why, read from `CAIRN_DLQ`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cairn.cli.app import HomeOpt, JsonOpt, app, console, fail, print_json, run_async, settings_for
from cairn.cli.plain import plain
from cairn.runtime.client import CairnClient
from cairn.runtime.deadletters import RUN_PREFIX, SOURCE, DeadLetterReport

# Past this many letters, `--limit` is refused: the reader asks for them one at a time.
MAX_LIMIT = 10_000


@app.command("dead-letters")
def dead_letters(
    run: Annotated[
        str | None,
        typer.Option("--run", help="Only letters about this run (an id or its first characters)."),
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(
            help="Only letters from this source: coordinator (bad commands), "
            "coordinator.<capability> (refused results), agent.<capability>."
        ),
    ] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many, newest first.")] = 20,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Messages cairn refused (bad input, forged or duplicate results, unknown versions), kept
    seven days in CAIRN_DLQ: counts by source and by reason, then the newest letters."""
    if not 0 <= limit <= MAX_LIMIT:
        fail(f"--limit {limit} is not between 0 and {MAX_LIMIT}")
    if source is not None and not SOURCE.fullmatch(source):
        fail(
            f"--source {source!r} is not a source: "
            "e.g. coordinator, coordinator.writer, agent.writer"
        )
    if run is not None and not RUN_PREFIX.fullmatch(run):
        fail(f"--run {run!r} is not a run id or the start of one (hex digits and '-')")
    settings = settings_for(home)

    async def go() -> DeadLetterReport:
        async with await CairnClient.connect(settings.nats_endpoint()) as client:
            return await client.dead_letters(run=run, source=source, limit=limit)

    report = run_async(go())
    if as_json:
        print_json(report.summary())
        return
    _show(report, run, source)


def _show(report: DeadLetterReport, run: str | None, source: str | None) -> None:
    if report.total == 0:
        console.print("no dead letters: cairn has refused nothing in the last seven days")
        return
    sources = ", ".join(f"{s} {n}" for s, n in sorted(report.by_source.items()))
    console.print(f"CAIRN_DLQ holds {report.total} dead letters (kept seven days): {sources}")
    filters = [f for f in (f"run {run}" if run else "", f"source {source}" if source else "") if f]
    if filters:
        console.print(f"{report.matched} of them match {' and '.join(filters)}")
    if report.by_reason:
        counted = sum(r.letters for r in report.by_reason)
        title = "by reason (ids and numbers masked)"
        if counted < report.matched:
            title += f", of the newest {counted} (--limit reads more)"
        reasons = Table(title=title, title_justify="left")
        reasons.add_column("letters", justify="right")
        reasons.add_column("source")
        reasons.add_column("reason", overflow="fold")
        for r in report.by_reason:
            reasons.add_row(str(r.letters), plain(r.source), plain(r.reason))
        console.print(reasons)
    if not report.letters:
        return
    table = Table(title=f"the newest {len(report.letters)}", title_justify="left")
    for col in ("seq", "stored", "source", "run", "subject", "reason"):
        table.add_column(col, overflow="fold")
    for stored in report.letters:
        row = stored.summary()
        table.add_row(
            str(stored.seq), stored.stored_at.strftime("%Y-%m-%d %H:%M:%S"), plain(stored.source),
            (row["run_id"] or "-")[:8], plain(_short(row["subject"], row["run_id"])),
            plain(row["reason"]),
        )  # fmt: skip
    console.print(table)


def _short(subject: str | None, run_id: str | None) -> str:
    """A subject with the run's id (shown in its own column) written as `<run>`."""
    if not subject:
        return "-"
    return subject.replace(run_id, "<run>") if run_id else subject
