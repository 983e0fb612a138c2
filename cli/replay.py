"""`cairn replay --check`: re-decide recorded histories (runs in the store or exported files) with
today's code and show the first event where the decisions would differ."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from cairn.cli.app import HomeOpt, JsonOpt, app, fail, print_json, say, settings_for, short
from cairn.cli.eventstore import open_store, run_in_store
from cairn.coordinator.domain.pricing import PriceTable
from cairn.coordinator.history.portable import read_history
from cairn.coordinator.history.replay import (
    Divergence,
    ReplayReport,
    check_history,
    replay_policy,
)
from cairn.coordinator.pricing import PriceTableError, load_price_table
from cairn.events import Event
from cairn.runtime.eventlog.store import EventStore


@app.command()
def replay(
    histories: Annotated[
        list[str] | None,
        typer.Argument(
            help="Runs in the store (id or prefix) or files from `cairn export`; "
            "default: every run in the store.",
            show_default=False,
        ),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Re-decide each history and compare (required).")
    ] = False,
    prices: Annotated[
        Path | None,
        typer.Option(
            "--prices",
            help="Price table to decide with (default: the shipped one or CAIRN_PRICES, "
            "whichever is the version the history's charges name).",
        ),
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-decide recorded histories with today's code; report where it would differ.

    For each run (or exported file) the first event where today's decisions differ from the
    recorded ones is shown with both versions. Exit 1 on any divergence, 2 when a history cannot
    be checked."""
    if not check:
        fail("replay checks histories: pass --check")
    settings = settings_for(home)
    table: PriceTable | None = None
    known: list[PriceTable] = []
    try:
        if prices is not None:
            table = load_price_table(prices)
        elif settings.prices:  # the coordinator's table, if it was another
            known.append(load_price_table(settings.prices))
    except PriceTableError as exc:
        fail(str(exc))
    store: EventStore | None = None
    sources: list[tuple[str, Callable[[], list[Event]]]] = []
    refs = histories or []
    if not refs:
        store = open_store(settings)
        sources = [(str(r), partial(store.load, r)) for r in store.run_ids()]
    for ref in refs:
        if ref.endswith(".jsonl") or Path(ref).is_file():
            sources.append((ref, partial(_portable_events, ref)))
        else:
            store = store or open_store(settings)
            sources.append((ref, partial(store.load, run_in_store(store, ref))))

    # One history at a time: a whole store's events need not fit in memory at once.
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    reports: list[ReplayReport] = []
    for source, load in sources:
        item, report = _replay_one(source, load, table, known, settings.contract_modules)
        results.append(item)
        if report is not None:
            reports.append(report)
        if not as_json:
            _print_replay(item)
    errors = len(results) - len(reports)
    events_total = sum(r.events for r in reports)
    seconds = sum(r.seconds for r in reports)
    diverged = sum(1 for r in reports if not r.ok)
    summary = {
        "histories": len(results),
        "identical": sum(1 for r in reports if r.ok),
        "diverged": diverged,
        "errors": errors,
        "events": events_total,
        "seconds": round(seconds, 6),
        "events_per_s": round(events_total / seconds) if seconds > 0 else None,
        "total_seconds": round(time.perf_counter() - started, 6),
    }
    if as_json:
        print_json({**summary, "results": results})
    else:
        rate = f" ({summary['events_per_s']:,} events/s)" if summary["events_per_s"] else ""
        say(
            f"replayed {len(results)} histor{'y' if len(results) == 1 else 'ies'}, "
            f"{events_total:,} events in {seconds:.3f}s{rate}: {summary['identical']} identical, "
            f"{diverged} diverged" + (f", {errors} not checked" if errors else "")
        )
    if errors:
        raise typer.Exit(2)
    if diverged:
        raise typer.Exit(1)


def _replay_one(
    source: str,
    load: Callable[[], list[Event]],
    prices: PriceTable | None,
    known: list[PriceTable],
    contract_modules: tuple[str, ...],
) -> tuple[dict[str, Any], ReplayReport | None]:
    try:
        events = load()
        policy = replay_policy(events, prices, known=known, contract_modules=contract_modules)
    except (ValueError, OSError) as exc:  # unreadable, or no price table for it
        return {"source": source, "ok": False, "error": str(exc)}, None
    report = check_history(events, policy)
    return {"source": source, **_report_json(report)}, report


def _portable_events(file: str) -> list[Event]:
    source = "stdin" if file == "-" else file
    if file == "-":
        return read_history(sys.stdin.buffer, source).events
    with Path(file).open("rb") as f:
        return read_history(f, source).events


def _event_json(event: Event | None) -> dict[str, Any] | None:
    if event is None:
        return None
    return {"type": event.type_name(), **event.model_dump(mode="json")}


def _divergence_json(d: Divergence) -> dict[str, Any]:
    return {
        "kind": d.kind,
        "position": d.position,
        "seq": d.recorded.seq,
        "fact": d.fact,
        "message": d.message,
        "recorded": _event_json(d.recorded),
        "today": _event_json(d.expected),
    }


def _report_json(report: ReplayReport) -> dict[str, Any]:
    return {
        "run_id": str(report.run_id) if report.run_id else None,
        "ok": report.ok,
        "events": report.events,
        "decisions": report.decisions,
        "seconds": round(report.seconds, 6),
        "divergence": _divergence_json(report.divergence) if report.divergence else None,
        "trailing": [e.type_name() for e in report.trailing],
    }


def _print_replay(item: dict[str, Any]) -> None:
    source = item["source"]
    label = f"run {source}" if _is_uuid(source) else source
    if "error" in item:
        say(f"{label}: not checked: {item['error']}", "red")
        return
    if item["ok"]:
        tail = (
            f"; today's code would go on with {', '.join(item['trailing'])}"
            if item["trailing"]
            else ""
        )
        say(f"{label}: identical ({item['events']} events, {item['decisions']} decisions){tail}")
        return
    d = item["divergence"]
    say(
        f"{label}: diverges at event {d['position']} of {item['events']} "
        f"({d['recorded']['type']}), deciding the {d['fact'] or 'history'}",
        "bold red",
    )
    say(f"  {d['message']}")
    recorded, today = d["recorded"], d["today"]
    if today is not None and recorded["type"] == today["type"]:
        fields = [k for k in recorded if recorded.get(k) != today.get(k)]
        recorded = {k: recorded[k] for k in ["type", *fields]}
        today = {k: today[k] for k in ["type", *fields]}
    say(f"  recorded: {short(json.dumps(recorded), 400)}")
    say(f"  today:    {short(json.dumps(today), 400) if today else 'nothing'}")


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True
