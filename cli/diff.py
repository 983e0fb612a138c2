"""`cairn diff`: where two runs' decisions, outputs and costs differ, step by step."""

from __future__ import annotations

from rich.table import Table

from cairn.cli.app import HomeOpt, JsonOpt, app, console, print_json, settings_for
from cairn.cli.eventstore import RunArg, events_of, open_store, run_in_store
from cairn.cli.history import jsonable
from cairn.cli.plain import plain


@app.command("diff")
def diff_command(
    run_a: RunArg,
    run_b: RunArg,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Where two runs' decisions, outputs and costs differ, step by step."""
    from cairn.coordinator.history.diff import diff_runs

    settings = settings_for(home)
    store = open_store(settings)
    try:
        first, second = run_in_store(store, run_a), run_in_store(store, run_b)
        result = diff_runs(events_of(store, first), events_of(store, second))
    finally:
        store.close()
    if as_json:
        print_json(
            {
                "runs": [str(first), str(second)],
                "status": list(result.status),
                "cost_usd": [str(c) for c in result.cost_usd],
                "events": list(result.events),
                "first_divergence": (
                    None
                    if result.first_divergence is None
                    else dict(zip(("seq", "a", "b"), result.first_divergence, strict=True))
                ),
                "steps": [jsonable(row) for row in result.steps],
            }
        )
        return
    console.print(
        f"[bold]A[/] {first} · {result.status[0]} · ${result.cost_usd[0]} · {result.events[0]} "
        f"events\n[bold]B[/] {second} · {result.status[1]} · ${result.cost_usd[1]} · "
        f"{result.events[1]} events"
    )
    if result.first_divergence is None:
        console.print("the decisions agree as far as the shorter history goes")
    else:
        seq, a, b = result.first_divergence
        console.print(plain(f"first different decision at event {seq}: A {a}, B {b}"))
    table = Table(title="steps (A | B)")
    for col in ("step", "status", "tries", "agents", "models", "output", "cost (USD)"):
        table.add_column(col)
    for row in result.steps:
        same = "same" if row.same_output else f"{row.output_hash[0][:8]} | {row.output_hash[1][:8]}"
        table.add_row(
            plain(row.step),
            " | ".join(row.status),
            f"{row.attempts[0]} | {row.attempts[1]}",
            plain(" | ".join(row.agents)),
            plain(" | ".join(row.models)),
            same,
            f"{row.cost_usd[0]} | {row.cost_usd[1]}",
        )
    console.print(table)
