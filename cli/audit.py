"""`cairn audit`, `cairn why` and `cairn projections status`: questions answered from the record.

`audit` and `projections status` read the views; `why` reads the run's own events from the
event store, which holds the inputs and outputs the views do not keep.
"""

from __future__ import annotations

import csv
import json
import sys
import uuid
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from cairn.cli.app import (
    HomeOpt,
    JsonOpt,
    app,
    console,
    fail,
    open_views,
    print_json,
    projections_app,
    resolve_run,
    run_id_from,
    settings_for,
)
from cairn.cli.plain import clean, plain, spreadsheet_safe
from cairn.events import Event, UnknownEventError, event_class
from cairn.runtime.eventlog.store import EventStore, StoreUnavailableError, describe, store_env
from cairn.runtime.settings import Settings

if TYPE_CHECKING:
    from cairn.projections import AuditRow, Provenance


class AuditFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


AUDIT_COLUMNS = (
    "position",
    "run_id",
    "seq",
    "at",
    "actor",
    "action",
    "step",
    "reason",
    "detail",
    "trace_id",
)


@app.command()
def audit(
    run: Annotated[str | None, typer.Option(help="Only this run (id or prefix).")] = None,
    actor: Annotated[
        str | None,
        typer.Option(
            help="Only this actor, e.g. coordinator; ending in ':' or '*' a prefix "
            "(agent:, human:, agent:researcher*)."
        ),
    ] = None,
    types: Annotated[
        list[str] | None,
        typer.Option("--type", help="Only events of this type, e.g. TaskFailed (repeatable)."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="From this ISO time or date (inclusive; UTC unless it says)."),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(help="Up to this ISO time or date (inclusive: a date means its whole day)."),
    ] = None,
    limit: Annotated[
        int, typer.Option(help="How many rows, the latest; newest last; 0: all.")
    ] = 200,
    output: Annotated[
        AuditFormat,
        typer.Option(
            "--format",
            help="table, json or csv (with a header row; a cell that would start a "
            "spreadsheet formula begins with ').",
        ),
    ] = AuditFormat.table,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Who decided what, when and why: the audit trail, filtered."""
    if as_json:
        if output not in (AuditFormat.table, AuditFormat.json):
            fail(f"--json and --format {output.value} disagree: give one of them")
        output = AuditFormat.json
    if limit < 0:
        fail("--limit must be 0 (all rows) or more")
    names = [_event_type(name) for name in types or []]
    start = _parse_time(since, "--since", end_of_day=False) if since else None
    end = _parse_time(until, "--until", end_of_day=True) if until else None
    if start and end and start > end:
        fail(f"--since {since} is after --until {until}: nothing can match")
    views = open_views(settings_for(home))
    run_id = resolve_run(views, run) if run else None
    rows: list[AuditRow] = views.audit(
        run_id=run_id,
        limit=limit or None,
        actor=actor,
        types=names,
        since=start,
        until=end,
    )
    if output is AuditFormat.json:
        print_json([r.model_dump(mode="json") for r in rows])
    elif output is AuditFormat.csv:
        _write_csv(rows)
    else:
        _print_audit(rows, limit)


def _write_csv(rows: list[AuditRow]) -> None:
    writer = csv.writer(sys.stdout)
    writer.writerow(AUDIT_COLUMNS)
    for row in rows:
        data = row.model_dump(mode="json")
        writer.writerow([_cell(data[c]) for c in AUDIT_COLUMNS])


def _cell(value: object) -> object:
    if value is None:
        return ""
    return spreadsheet_safe(value) if isinstance(value, str) else value


def _print_audit(rows: list[AuditRow], limit: int) -> None:
    table = Table(title="audit")
    for col in ("time", "run", "seq", "actor", "action", "step", "what", "why"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.at.strftime("%Y-%m-%d %H:%M:%S"),
            str(r.run_id)[:8],
            str(r.seq),
            plain(r.actor),
            r.action,
            plain(r.step or ""),
            plain(r.detail),
            plain(r.reason),
        )
    shown = f"{len(rows)} rows"
    if limit and len(rows) == limit:
        shown += f", the latest {limit} (--limit 0 for all)"
    table.caption = shown
    console.print(table)


def _event_type(name: str) -> str:
    try:
        return event_class(name).type_name()
    except UnknownEventError:
        known = _known_types()
    matches = [candidate for candidate in known if candidate.lower() == name.lower()]
    if not matches:
        fail(f"--type {name!r} is not an event type; the types are: {', '.join(known)}")
    return matches[0]


def _known_types() -> list[str]:
    found: set[str] = set()
    todo: list[type[Event]] = [Event]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            todo.append(sub)
            try:
                event_class(sub.type_name())
            except UnknownEventError:
                continue
            found.add(sub.type_name())
    return sorted(found)


def _parse_time(text: str, option: str, *, end_of_day: bool) -> datetime:
    from cairn.projections.filters import BadInstantError, parse_instant

    try:
        return parse_instant(text, option, end_of_day=end_of_day)
    except BadInstantError as exc:
        fail(str(exc))


# -- why -------------------------------------------------------------------------------------


@app.command()
def why(
    run: Annotated[str, typer.Argument(help="A run id or a unique prefix of one.")],
    step: Annotated[str, typer.Argument(help="The step's name, e.g. research.")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Where a step's output came from: intent, input, lineage, attempts, charges, output."""
    from cairn.projections import StepNotFoundError, step_provenance

    settings = settings_for(home)
    run_id = run_id_from(settings, run)
    events = _load_run(settings, run_id)
    try:
        found = step_provenance(events, step)
    except StepNotFoundError as exc:
        fail(str(exc))
    if as_json:
        print_json(found.model_dump(mode="json"))
    else:
        _print_provenance(found)


def _open_store(settings: Settings) -> EventStore:
    env = store_env(settings.store)
    path = env.get("SQLITE_DBNAME")
    if path is not None and not Path(path).is_file():
        # Opening would create an empty store; a question about the record needs a record.
        fail(f"no event store at {path}: start cairn (`cairn up`) or set CAIRN_STORE")
    try:
        return EventStore.from_settings(settings)
    except StoreUnavailableError as exc:
        fail(str(exc))


def _load_run(settings: Settings, run_id: uuid.UUID) -> list[Event]:
    store = _open_store(settings)
    try:
        events = store.load(run_id)
    except UnknownEventError as exc:
        fail(f"cannot read run {run_id}: {exc}")
    finally:
        store.close()
    if not events:
        fail(f"no run {run_id} in the event store ({describe(settings.store)})")
    return events


def _print_provenance(p: Provenance) -> None:
    out = console
    out.print(
        Text.assemble(
            ("why ", "bold"),
            Text(clean(p.step), style="bold"),
            f" of run {p.run_id} · ",
            (p.status, "bold"),
            f" · ${p.cost_usd:f} over {len(p.attempts)} attempt(s)",
        )
    )
    if p.intent is not None:
        out.print(plain(f"intent: {p.intent.goal}"))
        for label, items in (
            ("constraints", p.intent.constraints),
            ("success criteria", p.intent.success_criteria),
        ):
            if items:
                out.print(plain(f"  {label}: " + "; ".join(items)))
    if p.input is not None:
        where = f"to {p.capability}" + (f", contract {p.contract}" if p.contract else "")
        out.print(plain(f"input (latest dispatch, {where}):"))
        out.print(plain(_indent(json.dumps(p.input, indent=2, ensure_ascii=False))))
    if p.lineage:
        out.print("built from:")
        for entry in p.lineage:
            mark = "recorded" if entry.confirmed else "NOT found as a TaskCompleted in this run"
            out.print(
                plain(
                    f"  {entry.step} attempt {entry.attempt} by {entry.agent_id}, "
                    f"output {entry.output_hash[:16]}… ({mark})"
                )
            )
    else:
        out.print("built from: no earlier outputs (only the run input)")
    if p.produced_by is not None:
        models = ", ".join(p.produced_by.models) or "no model reported"
        out.print(
            plain(
                f"produced by: {p.produced_by.agent_id} (attempt {p.produced_by.attempt}) "
                f"with {models}"
            )
        )

    table = Table(title="attempts")
    for col in ("try", "dispatched", "outcome", "agent", "errors", "charges", "USD"):
        table.add_column(col)
    for a in p.attempts:
        charges = "\n".join(
            f"{c.model} {c.input_tokens}+{c.output_tokens} ${c.amount_usd:f}" for c in a.charges
        )
        ignored = [r for r in a.results if r.ignored]
        errors = list(a.errors) + [f"result ignored: {r.ignored}" for r in ignored]
        table.add_row(
            str(a.attempt),
            a.dispatched_at.strftime("%H:%M:%S.%f")[:-3],
            a.outcome,
            plain(a.agent_id or ""),
            plain("\n".join(errors)),
            plain(charges),
            f"{a.cost_usd:f}",
        )
    out.print(table)
    if p.approvals:
        out.print("approvals:")
        for row in p.approvals:
            out.print(plain(f"  {row.at:%H:%M:%S} {row.action} by {row.actor}: {row.reason}"))
    else:
        out.print("approvals: none")
    if p.output_hash is None:
        out.print("output: none accepted yet")
        return
    if p.output_verified:
        verdict = "matches the hash TaskCompleted recorded"
    else:
        verdict = "DOES NOT match the hash TaskCompleted recorded"
    out.print(plain(f"output: sha256 {p.output_hash} ({verdict})"))
    out.print(plain(_indent(json.dumps(p.output, indent=2, ensure_ascii=False))))


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


# -- projections status ----------------------------------------------------------------------


@projections_app.command("status")
def projections_status(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """How far each projection's views have followed the event log."""
    from cairn.projections import ViewsUnavailableError, projection_status

    settings = settings_for(home)
    _open_store(settings).close()  # a clear error when there is no store to follow
    try:
        rows = projection_status(settings)
    except (StoreUnavailableError, ViewsUnavailableError) as exc:
        fail(str(exc))
    if as_json:
        print_json([r.model_dump(mode="json") for r in rows])
        return
    table = Table(title="projections")
    for col in ("projection", "views", "position", "log", "lag", "last projected event"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.name,
            ", ".join(r.views),
            str(r.position) if r.built else "not built",
            str(r.log_position),
            str(r.lag),
            _behind(r.last_event_at, r.log_last_event_at),
        )
    table.caption = "the views record the log position they reflect, not when they reached it"
    console.print(table)


def _behind(projected: datetime | None, last: datetime | None) -> str:
    if projected is None:
        return "none"
    text = projected.strftime("%Y-%m-%d %H:%M:%S")
    if last is not None and last > projected:
        text += f" ({_span((last - projected).total_seconds())} before the log's last)"
    return text


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"
