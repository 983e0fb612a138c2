"""`cairn verify`: check the hash chain of every run in the event store and name the first broken
link of each."""

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
    """Check the hash chain of every run in the event store (exit 1 if one is broken).

    Names the first broken link of each run (run, seq, expected and found hash), missing events,
    and runs that do not begin with RunStarted.

    An edit of a run's last event cannot show in its chain: keep the `head` hashes (--json)
    elsewhere to protect the tails too."""
    store = open_store(settings_for(home))
    runs = [run_in_store(store, run)] if run else None
    started = time.perf_counter()
    reports = verify_store(store, runs)
    seconds = time.perf_counter() - started
    broken = [r for r in reports if not r.ok]
    events = sum(r.events for r in reports)
    if as_json:
        print_json(
            {
                "ok": not broken,
                "runs": len(reports),
                "broken": len(broken),
                "events": events,
                "seconds": round(seconds, 6),
                "chains": [_chain_json(r) for r in reports],
            }
        )
    else:
        for r in broken:
            _print_chain(r)
        if broken:
            say(
                f"{len(broken)} of {len(reports)} run(s) have a broken chain "
                f"({events:,} events checked)"
            )
        else:
            say(f"verified {len(reports)} run(s), {events:,} events: every chain is intact")
    if broken:
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
