"""`cairn verify`: check every run's hash chain and signed checkpoint, and the store's signed
head; name the first broken link of each run."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from cairn.cli.app import HomeOpt, JsonOpt, app, print_json, say, settings_for
from cairn.cli.eventstore import open_store, run_in_store
from cairn.coordinator.history.verify import ChainReport, verify_store


@app.command()
def verify(
    run: Annotated[
        str | None, typer.Argument(help="Only this run (id or prefix); default: every run.")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check every run's hash chain and signed checkpoint, and the store's signed head (exit 1
    if anything is wrong).

    Names the first broken link of each run (run, seq, expected and found hash), missing
    events, runs that do not begin with RunStarted, runs cut short or re-chained since they
    were signed, and runs deleted whole."""
    store = open_store(settings_for(home))
    runs = [run_in_store(store, run)] if run else None
    started = time.perf_counter()
    reports = verify_store(store, runs)
    seconds = time.perf_counter() - started
    whole = next((r for r in reports if r.is_store), None)
    chains = [r for r in reports if not r.is_store]
    broken = [r for r in chains if not r.ok]
    events = sum(r.events for r in chains)
    if as_json:
        print_json(
            {
                "ok": not broken and whole is None,
                "runs": len(chains),
                "broken": len(broken),
                "events": events,
                "seconds": round(seconds, 6),
                "chains": [_chain_json(r) for r in chains],
                "store": {
                    "ok": whole is None,
                    "problems": [p.message for p in whole.problems] if whole else [],
                },
            }
        )
    else:
        for r in broken:
            _print_chain(r)
        if whole is not None:
            for p in whole.problems:
                say(f"the store: {p.message}", "red")
        if broken:
            say(
                f"{len(broken)} of {len(chains)} run(s) have a broken chain "
                f"({events:,} events checked)"
            )
        elif whole is None:
            say(
                f"verified {len(chains)} run(s), {events:,} events: every chain is intact and "
                "matches its signed checkpoint"
            )
    if broken or whole is not None:
        raise typer.Exit(1)


def _chain_json(r: ChainReport) -> dict[str, Any]:
    return {
        "run_id": str(r.run_id),
        "ok": r.ok,
        "events": r.events,
        "head": r.head,
        "problems": [
            {
                "seq": p.seq,
                "kind": p.kind,
                "message": p.message,
                "expected": p.expected,
                "found": p.found,
                "blob": p.blob,
            }
            for p in r.problems[:50]
        ],
    }


def _print_chain(r: ChainReport) -> None:
    first = r.problems[0]
    say(f"run {r.run_id}: broken at event {first.seq}: {first.message}", "bold red")
    if first.blob is not None:
        say(
            f"  {first.blob} stored as sha256 {first.expected}\n"
            f"  its bytes now hash to  {first.found or '(missing)'}"
        )
    elif first.expected is not None:
        say(
            f"  expected prev_hash {first.expected or '(empty)'}\n"
            f"  found    prev_hash {first.found or '(empty)'}"
        )
    if len(r.problems) > 1:
        say(f"  (and {len(r.problems) - 1} more problem(s) after it)")
