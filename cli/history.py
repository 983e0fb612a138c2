"""`cairn history` and `cairn state`: a run's timeline and its state after any event, read from
the event store (not the views), for debugging and auditing. The other commands on a run's
record: `portable` (export, import), `replay`, `verify`, `diff`."""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.table import Table

from cairn.cli.app import (
    HomeOpt,
    JsonOpt,
    app,
    console,
    fail,
    print_json,
    print_lines,
    say,
    settings_for,
    short,
)
from cairn.cli.eventstore import RunArg, events_of, open_store, run_in_store
from cairn.cli.plain import plain
from cairn.coordinator.domain.state import EvolveError, RunState, fold
from cairn.events import Event


def _where(event: Event) -> str:
    step = getattr(event, "step", None)
    if not isinstance(step, str):
        return ""
    attempt = getattr(event, "attempt", None)
    return f"{step}#{attempt}" if isinstance(attempt, int) and attempt else step


# -- history ----------------------------------------------------------------------------------


@app.command()
def history(run: RunArg, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """A run's timeline from the event store, one line per event.

    Each line: seq, time, type, step#attempt, actor, reason. Read from the store, not the views."""
    store = open_store(settings_for(home))
    run_id = run_in_store(store, run)
    events = events_of(store, run_id)
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
            f"{_where(e):<{where_width}}  {short(e.actor, actor_width):<{actor_width}}  "
            f"{short(e.reason, 72)}"
        )
    print_lines(lines)


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
    store = open_store(settings_for(home))
    run_id = run_in_store(store, run)
    events = events_of(store, run_id)
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
    say(f"run {s.run_id} · {s.workflow.name} v{s.workflow.version} · {s.status}", "bold")
    say(
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
    say(spent)
    table = Table(title="steps")
    for col in ("step", "status", "try", "agent", "output hash", "last error"):
        table.add_column(col)
    for name, st in s.steps.items():
        table.add_row(
            plain(name),
            st.status,
            str(st.attempt),
            plain(st.agent_id),
            (st.output_hash or "")[:12],
            plain(short(st.last_error or "", 50)),
        )
    console.print(table)
    pending = [a for a in getattr(s, "approvals", {}).values() if a.status == "pending"]
    for a in pending:
        say(
            f"waiting for approval: {a.step} ({a.kind}) from {a.group}, due "
            f"{a.due_at.isoformat(sep=' ', timespec='seconds')}"
        )
    if s.error:
        say(f"error: {s.error}", "red")
    if s.status == "completed":
        say(f"output: {short(json.dumps(jsonable(s.output)), 200)}")
