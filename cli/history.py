"""`cairn history`, `state`, `export`, `import`, `replay` and `verify`: a run's record as the
event store holds it (not the views), for debugging, auditing and moving histories around."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from cairn.cli.app import HomeOpt, JsonOpt, app, console, fail, print_json, settings_for
from cairn.coordinator.domain.pricing import PriceTable
from cairn.coordinator.domain.state import EvolveError, RunState, fold
from cairn.coordinator.history.portable import (
    PortableError,
    PortableHistory,
    export_lines,
    import_history,
    read_history,
)
from cairn.coordinator.history.replay import (
    Divergence,
    ReplayReport,
    check_history,
    replay_policy,
)
from cairn.coordinator.history.verify import ChainReport, check_chain, verify_store
from cairn.coordinator.pricing import PriceTableError, load_price_table
from cairn.events import Event
from cairn.runtime.eventlog.store import EventStore, RunNotFoundError, StoreUnavailableError
from cairn.runtime.settings import Settings

err_console = Console(stderr=True)

RunArg = Annotated[str, typer.Argument(help="A run id or a unique prefix of one.")]


def _open_store(settings: Settings, *, create: bool = False) -> EventStore:
    url = settings.store
    is_sqlite = not url.startswith(("postgresql://", "postgres://"))
    if is_sqlite and not create:
        path = Path(url.removeprefix("sqlite:///").removeprefix("sqlite://"))
        if not path.exists():
            fail(
                f"no event store at {path}: nothing has been recorded there "
                "(give --home or set CAIRN_STORE)"
            )
    try:
        return EventStore.from_settings(settings)
    except StoreUnavailableError as exc:
        fail(str(exc))


def _resolve(store: EventStore, ref: str) -> uuid.UUID:
    try:
        return store.resolve_run(ref)
    except RunNotFoundError as exc:
        fail(str(exc))


def _load(store: EventStore, run_id: uuid.UUID) -> list[Event]:
    try:
        return store.load(run_id)
    except ValueError as exc:  # an unknown type, a newer version, a damaged event
        fail(f"cannot read run {run_id}: {exc}")


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _where(event: Event) -> str:
    step = getattr(event, "step", None)
    if not isinstance(step, str):
        return ""
    attempt = getattr(event, "attempt", None)
    return f"{step}#{attempt}" if isinstance(attempt, int) and attempt else step


def _say(text: str, style: str | None = None) -> None:
    """Print plain text (no markup) without wrapping it into several lines."""
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


def _print_lines(lines: list[str]) -> None:
    """One line each: cropped to a terminal's width, whole when piped."""
    for line in lines:
        if console.is_terminal:
            console.print(line, markup=False, highlight=False, no_wrap=True, overflow="ellipsis")
        else:
            sys.stdout.write(line + "\n")


# -- history ----------------------------------------------------------------------------------


@app.command()
def history(run: RunArg, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """A run's timeline from the event store, one line per event.

    Each line: seq, time, type, step#attempt, actor, reason. Read from the store, not the views."""
    store = _open_store(settings_for(home))
    run_id = _resolve(store, run)
    events = _load(store, run_id)
    if as_json:
        print_json(
            {
                "run_id": str(run_id),
                "events": [
                    {
                        "seq": e.seq,
                        "at": e.at,
                        "type": e.type_name(),
                        "actor": e.actor,
                        "reason": e.reason,
                        "trace_id": e.trace_id,  # the run's trace, when it was traced
                        "event": e.model_dump(mode="json"),
                    }
                    for e in events
                ],
            }
        )
        return
    days = {e.at.date() for e in events}
    fmt = "%H:%M:%S.%f" if len(days) <= 1 else "%m-%d %H:%M:%S.%f"
    first = events[0]
    title = getattr(first, "workflow", None)
    name = f"{title.name} v{title.version}" if title is not None else first.type_name()
    lines = [
        f"run {run_id} · {name} · {len(events)} events · {first.at.strftime('%Y-%m-%d %Z').strip()}"
    ]
    type_width = max(len(e.type_name()) for e in events)
    where_width = max([len(_where(e)) for e in events] + [4])
    actor_width = min(max(len(e.actor) for e in events), 28)
    lines.append(
        f"{'seq':>4}  {'time':<{len(first.at.strftime(fmt)) - 3}}  {'type':<{type_width}}  "
        f"{'step':<{where_width}}  {'actor':<{actor_width}}  reason"
    )
    for e in events:
        lines.append(
            f"{e.seq:>4}  {e.at.strftime(fmt)[:-3]}  {e.type_name():<{type_width}}  "
            f"{_where(e):<{where_width}}  {_short(e.actor, actor_width):<{actor_width}}  "
            f"{_short(e.reason, 72)}"
        )
    _print_lines(lines)


# -- state --at -------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """Run state (dataclasses holding pydantic models, decimals, times, tuple keys) as JSON."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {
            "/".join(str(p) for p in k) if isinstance(k, tuple) else str(k): jsonable(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(jsonable(v) for v in value)
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


@app.command()
def state(
    run: RunArg,
    at: Annotated[
        int | None,
        typer.Option("--at", help="The state right after this event (default: the last).", min=1),
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A run's state right after event SEQ, folded from the event store."""
    store = _open_store(settings_for(home))
    run_id = _resolve(store, run)
    events = _load(store, run_id)
    seq = len(events) if at is None else at
    if seq > len(events):
        fail(f"run {run_id} has {len(events)} events; --at must be 1 to {len(events)}")
    try:
        folded = fold(events[:seq])
    except EvolveError as exc:
        fail(f"run {run_id} does not fold up to event {seq}: {exc}")
    assert folded is not None
    event = events[seq - 1]
    if as_json:
        print_json(
            {
                "at_seq": seq,
                "events": len(events),
                "event": {"type": event.type_name(), "at": event.at},
                "state": jsonable(folded),
            }
        )
        return
    _print_state(folded, event, len(events))


def _print_state(s: RunState, event: Event, total: int) -> None:
    _say(f"run {s.run_id} · {s.workflow.name} v{s.workflow.version} · {s.status}", "bold")
    _say(
        f"after event {event.seq} of {total}: {event.type_name()} at "
        f"{event.at.isoformat(sep=' ', timespec='milliseconds')}"
    )
    budget = getattr(s, "budget", None)
    spent = f"cost so far: ${s.cost_usd}"
    tokens = getattr(s, "spent_tokens", None)
    if tokens is not None:
        spent += f" ({tokens:,} tokens)"
    if budget is not None:
        spent += f" · budget: ${budget.usd if budget.usd is not None else '-'}"
        reserved = getattr(s, "reserved_usd", None)
        if reserved:
            spent += f", ${reserved} reserved"
    _say(spent)
    table = Table(title="steps")
    for col in ("step", "status", "try", "agent", "output hash", "last error"):
        table.add_column(col)
    for name, st in s.steps.items():
        table.add_row(
            name,
            st.status,
            str(st.attempt),
            st.agent_id or "",
            (st.output_hash or "")[:12],
            _short(st.last_error or "", 50),
        )
    console.print(table)
    pending = [a for a in getattr(s, "approvals", {}).values() if a.status == "pending"]
    for a in pending:
        _say(
            f"waiting for approval: {a.step} ({a.kind}) from {a.group}, due "
            f"{a.due_at.isoformat(sep=' ', timespec='seconds')}"
        )
    if s.error:
        _say(f"error: {s.error}", "red")
    if s.status == "completed":
        _say(f"output: {_short(json.dumps(jsonable(s.output)), 200)}")


# -- export / import --------------------------------------------------------------------------


@app.command()
def export(
    run: RunArg,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of to stdout.")
    ] = None,
    home: HomeOpt = None,
) -> None:
    """Write a run's history as a portable file (JSON lines) to stdout or --output.

    The first line is a header (format and version, run id, event count, the chain's last hash),
    then one line per event exactly as stored:
    {"type": "Name@version", "seq": n, "event": {...}}."""
    store = _open_store(settings_for(home))
    run_id = _resolve(store, run)
    rows = store.rows(run_id)
    chain = check_chain(run_id, rows)
    if not chain.ok:
        first = chain.problems[0]
        err_console.print(
            f"warning: run {run_id}'s chain is broken at event {first.seq} ({first.message}); "
            "exported as stored, but `cairn import` will refuse the file",
            style="yellow",
            markup=False,
            highlight=False,
        )
    data = b"".join(export_lines(run_id, rows))
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        try:
            output.write_bytes(data)
        except OSError as exc:
            fail(f"cannot write {output}: {exc.strerror}")


@app.command("import")
def import_run(
    file: Annotated[str, typer.Argument(help="A file written by `cairn export` (- for stdin).")],
    allow_unfinished: Annotated[
        bool,
        typer.Option(
            "--allow-unfinished",
            help="Import a run that had not ended (a coordinator restarted on this store would "
            "take it over and dispatch its tasks).",
        ),
    ] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a run exported by `cairn export` to the event store, for replay and audit.

    Checks every line first (it decodes, seqs run 1..n, the hash chain is intact, the run is not
    in the store yet) and writes all events in one transaction, or nothing. A coordinator that
    is running does not learn about an imported run: imported runs are for `cairn replay`,
    `history`, `state`, `verify` and the views, not to be continued."""
    history = _read_portable(file)
    settings = settings_for(home)
    store = _open_store(settings, create=True)
    try:
        positions = import_history(store, history, allow_unfinished=allow_unfinished)
    except PortableError as exc:
        fail(str(exc))
    result = {
        "run_id": str(history.run_id),
        "events": len(history.rows),
        "status": history.state.status,
        "positions": [positions[0], positions[-1]] if positions else [],
    }
    if as_json:
        print_json(result)
    else:
        _say(f"imported run {history.run_id} ({history.state.status}, {len(history.rows)} events)")


def _read_portable(file: str) -> PortableHistory:
    source = "stdin" if file == "-" else file
    try:
        if file == "-":
            return read_history(sys.stdin.buffer, source)
        with Path(file).open("rb") as f:
            return read_history(f, source)
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}")
    except PortableError as exc:
        fail(str(exc))


# -- replay --check ---------------------------------------------------------------------------


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
        store = _open_store(settings)
        sources = [(str(r), partial(store.load, r)) for r in store.run_ids()]
    for ref in refs:
        if ref.endswith(".jsonl") or Path(ref).is_file():
            sources.append((ref, partial(_portable_events, ref)))
        else:
            store = store or _open_store(settings)
            sources.append((ref, partial(store.load, _resolve(store, ref))))

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
        _say(
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
        _say(f"{label}: not checked: {item['error']}", "red")
        return
    if item["ok"]:
        tail = (
            f"; today's code would go on with {', '.join(item['trailing'])}"
            if item["trailing"]
            else ""
        )
        _say(f"{label}: identical ({item['events']} events, {item['decisions']} decisions){tail}")
        return
    d = item["divergence"]
    _say(
        f"{label}: diverges at event {d['position']} of {item['events']} "
        f"({d['recorded']['type']}), deciding the {d['fact'] or 'history'}",
        "bold red",
    )
    _say(f"  {d['message']}")
    recorded, today = d["recorded"], d["today"]
    if today is not None and recorded["type"] == today["type"]:
        fields = [k for k in recorded if recorded.get(k) != today.get(k)]
        recorded = {k: recorded[k] for k in ["type", *fields]}
        today = {k: today[k] for k in ["type", *fields]}
    _say(f"  recorded: {_short(json.dumps(recorded), 400)}")
    _say(f"  today:    {_short(json.dumps(today), 400) if today else 'nothing'}")


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


# -- verify -----------------------------------------------------------------------------------


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
    store = _open_store(settings_for(home))
    runs = [_resolve(store, run)] if run else None
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
            _say(
                f"{len(broken)} of {len(reports)} run(s) have a broken chain "
                f"({events:,} events checked)"
            )
        else:
            _say(f"verified {len(reports)} run(s), {events:,} events: every chain is intact")
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
    _say(f"run {r.run_id}: broken at event {first.seq}: {first.message}", "bold red")
    if first.blob is not None:
        _say(
            f"  {first.blob} stored as sha256 {first.expected}\n"
            f"  its bytes now hash to  {first.found or '(missing)'}"
        )
    elif first.expected is not None:
        _say(
            f"  expected prev_hash {first.expected or '(empty)'}\n"
            f"  found    prev_hash {first.found or '(empty)'}"
        )
    if len(r.problems) > 1:
        _say(f"  (and {len(r.problems) - 1} more problem(s) after it)")


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
    store = _open_store(settings)
    try:
        first, second = _resolve(store, run_a), _resolve(store, run_b)
        result = diff_runs(_load(store, first), _load(store, second))
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
        console.print(f"first different decision at event {seq}: A {a}, B {b}")
    table = Table(title="steps (A | B)")
    for col in ("step", "status", "tries", "agents", "models", "output", "cost (USD)"):
        table.add_column(col)
    for row in result.steps:
        same = "same" if row.same_output else f"{row.output_hash[0][:8]} | {row.output_hash[1][:8]}"
        table.add_row(
            row.step,
            " | ".join(row.status),
            f"{row.attempts[0]} | {row.attempts[1]}",
            " | ".join(row.agents),
            " | ".join(row.models),
            same,
            f"{row.cost_usd[0]} | {row.cost_usd[1]}",
        )
    console.print(table)
