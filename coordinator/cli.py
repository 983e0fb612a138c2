"""The `cairn` command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from cairn.events import Budget, CommandReply, Usage, WorkflowSpec

from .client import CairnClient, CoordinatorUnavailableError
from .demo import (
    DEMO_TOPIC,
    DEMO_WORKFLOW,
    DemoError,
    auto_approver,
    demo_intent,
    prompt_approver,
    run_and_follow,
    start_services,
    wait_for_services,
    waiting_notice,
)
from .embedded import EmbeddedServerError
from .nats_client import NatsUnavailableError
from .settings import Settings
from .store import StoreUnavailableError
from .workflow import WorkflowError, load_workflow_file

app = typer.Typer(
    help="cairn: an event-sourced coordinator for AI agents that run as separate services.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
projections_app = typer.Typer(help="Follow, rebuild and inspect the projections' views.")
app.add_typer(projections_app, name="projections")

console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")

HomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home", help="Data directory (default $CAIRN_HOME or .cairn).", show_default=False
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for tools.")]


def fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine, turning known infrastructure problems into one clear sentence."""
    try:
        return asyncio.run(coro)
    except (
        NatsUnavailableError,
        CoordinatorUnavailableError,
        StoreUnavailableError,
        EmbeddedServerError,
        DemoError,
        WorkflowError,
    ) as exc:
        fail(str(exc))


def print_json(data: Any) -> None:
    def default(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        if isinstance(value, Decimal | uuid.UUID | Path):
            return str(value)
        if hasattr(value, "isoformat"):
            return value.isoformat()
        raise TypeError(f"cannot encode {type(value).__name__}")

    sys.stdout.write(json.dumps(data, default=default, indent=2) + "\n")


def send_command(
    settings: Settings, call: Callable[[CairnClient], Awaitable[CommandReply]]
) -> dict[str, Any]:
    """Send one command to the coordinator over NATS; its reply as JSON-able data."""

    async def go() -> dict[str, Any]:
        async with await CairnClient.connect(settings.nats_endpoint()) as client:
            reply = await call(client)
            return reply.model_dump(mode="json")

    return run_async(go())


def settings_for(home: Path | None) -> Settings:
    return Settings.from_env(home)


def _views(settings: Settings) -> Any:
    from cairn.projections import Views, ViewsMissingError

    try:
        return Views(settings.views)
    except ViewsMissingError as exc:
        fail(str(exc))


def _resolve(views: Any, ref: str) -> str:
    """A full run id from an id or a unique prefix, or one clear error."""
    from cairn.projections import RunNotFoundError

    try:
        run_id: str = views.resolve(ref)
    except RunNotFoundError as exc:
        fail(str(exc))
    return run_id


# -- running things ---------------------------------------------------------------------------


@app.command()
def demo(
    home: HomeOpt = None,
    topic: Annotated[str, typer.Option(help="What the example report is about.")] = DEMO_TOPIC,
    as_json: JsonOpt = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the run.")] = 60.0,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Approve the demo's gate automatically.")
    ] = False,
) -> None:
    """Start NATS, the coordinator, projections and four agents as processes; run the example.

    The run stops at an approval gate before the report is written: answer the prompt, run
    `cairn approve RUN write --as NAME` from another terminal, or pass --yes."""
    settings = settings_for(home)
    result = run_async(_demo(settings, topic, as_json, timeout, yes))
    if as_json:
        print_json(result)
        return
    if result["status"] != "completed":
        fail(f"the run ended {result['status']}: {result.get('error')}", code=1)


async def _demo(
    settings: Settings, topic: str, as_json: bool, timeout: float, yes: bool
) -> dict[str, Any]:
    show = None if as_json else console
    who = os.environ.get("USER") or "demo-user"
    if yes:
        approver = auto_approver(f"{who} (demo --yes)")
    elif sys.stdin.isatty() and not as_json:
        approver = prompt_approver(console, who)
    else:
        approver = waiting_notice(err_console)
    sup = await start_services(settings)
    try:
        if show:
            show.print(
                f"[bold]cairn demo[/] · NATS {sup.settings.resolved_nats_url()} · "
                f"data in {settings.home}"
            )
            show.print(
                "started as separate processes: "
                + ", ".join(f"{n} (pid {p.pid})" for n, p in sup.processes.items())
            )
        client = await CairnClient.connect(sup.settings.nats_endpoint(), "cairn-demo")
        try:
            await wait_for_services(sup, client, timeout=30)
            result = await run_and_follow(
                client,
                DEMO_WORKFLOW,
                {"topic": topic, "audience": "curious readers"},
                demo_intent(topic),
                show,
                timeout,
                sup,
                approver,
            )
        finally:
            await client.close()
        from cairn.projections import wait_for_views

        await asyncio.to_thread(wait_for_views, settings.views, result.progress.position, 15.0)
        summary = _summary(settings, result.run_id)
        summary["seconds"] = round(result.seconds, 3)
        summary["processes"] = {n: p.pid for n, p in sup.processes.items()}
        if sup.nats is not None and sup.nats.process is not None:
            summary["processes"]["nats-server"] = sup.nats.process.pid
        if show:
            _print_summary(show, summary, result.progress.output)
        return summary
    finally:
        sup.stop_all()


def _summary(settings: Settings, run_id: uuid.UUID) -> dict[str, Any]:
    views = _views(settings)
    run = views.run(str(run_id))
    assert run is not None
    costs = views.costs(by="model", run_id=str(run_id))
    short = str(run_id)[:8]
    return {
        "run_id": str(run_id),
        "status": run.status,
        "error": run.error,
        "output": run.output,
        "cost_usd": str(run.cost_usd),
        "costs_by_model": [c.model_dump(mode="json") for c in costs],
        "next": [
            f"cairn show {short}",
            f"cairn costs --by agent --run {short}",
            f"cairn audit --run {short}",
            "cairn runs",
        ],
    }


def _print_summary(show: Console, summary: dict[str, Any], output: Any) -> None:
    show.print()
    if summary["status"] == "completed" and isinstance(output, dict):
        report = output.get("report", {})
        review = output.get("review", {})
        show.print(f"[bold]{report.get('title', 'Report')}[/]")
        for section in report.get("sections", []):
            show.print(f"  [bold]{section.get('heading')}[/]")
            show.print(f"    {section.get('body')}", highlight=False)
        verdict = "approved" if review.get("approved") else "not approved"
        show.print(f"review: {verdict}, score {review.get('score')}")
    else:
        show.print(f"[red]run {summary['status']}[/]: {summary.get('error')}")
    costs = ", ".join(
        f"{c['key']}: {c['input_tokens']}+{c['output_tokens']} tokens, ${c['amount_usd']}"
        for c in summary["costs_by_model"]
    )
    show.print(f"cost: [bold]${summary['cost_usd']}[/] ({costs})")
    show.print("look further:")
    for command in summary["next"]:
        show.print(f"  {command}")


@app.command()
def up(home: HomeOpt = None) -> None:
    """Start everything but a run (NATS, coordinator, projections, agents) until Ctrl-C."""
    settings = settings_for(home)
    run_async(_up(settings))


async def _up(settings: Settings) -> None:
    sup = await start_services(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        from .cli_serve import dashboard_lines, start_dashboard

        dashboard = start_dashboard(sup)
        client = await CairnClient.connect(sup.settings.nats_endpoint(), "cairn-up")
        try:
            await wait_for_services(sup, client, timeout=30)
        finally:
            await client.close()
        console.print(f"cairn is up · NATS {sup.settings.resolved_nats_url()}")
        console.print(f"data in {settings.home}, logs in {settings.home / 'logs'}")
        for name, proc in sup.processes.items():
            console.print(f"  {name}: pid {proc.pid}")
        for line in await dashboard_lines(sup, dashboard):
            console.print(line, highlight=False, soft_wrap=True)
        console.print(
            'start a run:  cairn run research-report --input \'{"topic": "tides"}\' --wait'
        )
        console.print("Ctrl-C stops everything.")
        while not stop.is_set():
            dead = sup.exited()
            if dead:
                name, code = next(iter(dead.items()))
                fail(f"the {name} process exited with code {code}:\n{sup.log_tail(name)}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    finally:
        sup.stop_all()
        console.print("stopped.")


@app.command("run")
def run_workflow(
    workflow: Annotated[str, typer.Argument(help="A workflow name, or a path to a YAML file.")],
    input: Annotated[str, typer.Option("--input", help="The run input as a JSON object.")] = "{}",
    wait: Annotated[bool, typer.Option("--wait", help="Follow the run until it ends.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 300.0,
    budget_usd: Annotated[
        str | None, typer.Option("--budget-usd", help="Most the run may spend, in USD.")
    ] = None,
    budget_tokens: Annotated[
        int | None, typer.Option("--budget-tokens", help="Most tokens the run may use.")
    ] = None,
    fail_closed: Annotated[
        bool,
        typer.Option("--fail-closed", help="Fail the run when its budget runs out (no asking)."),
    ] = False,
    tenant: Annotated[str, typer.Option(help="Whose budget and costs the run counts to.")] = (
        "default"
    ),
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a run of a workflow."""
    try:
        data = json.loads(input)
    except json.JSONDecodeError as exc:
        fail(f"--input is not valid JSON: {exc}")
    if not isinstance(data, dict):
        fail('--input must be a JSON object, e.g. \'{"topic": "tides"}\'')
    spec: str | WorkflowSpec = workflow
    if workflow.endswith((".yaml", ".yml")) or Path(workflow).is_file():
        try:
            spec = load_workflow_file(Path(workflow))
        except WorkflowError as exc:
            fail(str(exc))
    budget = None
    if budget_usd is not None or budget_tokens is not None:
        try:
            budget = Budget(
                usd=Decimal(budget_usd) if budget_usd is not None else None,
                tokens=budget_tokens,
                on_exhausted="fail" if fail_closed else "ask",
            )
        except (ArithmeticError, ValueError) as exc:
            fail(f"--budget-usd must be a non-negative amount like 0.50 ({exc})")
    settings = settings_for(home)
    outcome = run_async(_run(settings, spec, data, wait, timeout, as_json, budget, tenant))
    if as_json:
        print_json(outcome)
    if outcome.get("status") in ("failed", "cancelled"):
        raise typer.Exit(1)


async def _run(
    settings: Settings,
    spec: str | WorkflowSpec,
    data: dict[str, Any],
    wait: bool,
    timeout: float,
    as_json: bool,
    budget: Budget | None = None,
    tenant: str = "default",
) -> dict[str, Any]:
    async with await CairnClient.connect(settings.nats_endpoint()) as client:
        if not wait:
            reply = await client.start_run(spec, data, budget=budget, tenant=tenant)
            if not reply.ok:
                raise DemoError(f"the coordinator refused the run: {reply.error}")
            if not as_json:
                console.print(f"started run {reply.run_id}")
            return {"run_id": str(reply.run_id), "status": reply.status}
        result = await run_and_follow(
            client, spec, data, None, None if as_json else console, timeout,
            approver=None if as_json else waiting_notice(console), budget=budget,
        )  # fmt: skip
        progress = result.progress
        if not as_json:
            console.print(f"run {result.run_id} {progress.status} in {result.seconds:.2f}s")
            if progress.error:
                console.print(f"[red]{progress.error}[/]")
        return {
            "run_id": str(result.run_id),
            "status": progress.status,
            "output": progress.output,
            "error": progress.error,
            "cost_usd": str(progress.cost),
            "position": progress.position,
        }


@app.command()
def cancel(
    run: Annotated[str, typer.Argument(help="The run's id.")],
    reason: Annotated[str, typer.Option(help="Why, for the record.")] = "",
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a run."""
    try:
        run_id = uuid.UUID(run)
    except ValueError:
        fail(f"{run!r} is not a run id (a UUID)")
    settings = settings_for(home)

    reply = send_command(settings, lambda client: client.cancel_run(run_id, reason))
    if as_json:
        print_json(reply)
    elif reply["ok"]:
        console.print(f"run {run_id} cancelled")
    if not reply["ok"]:
        fail(reply["error"], code=1)


@app.command()
def coordinator(home: HomeOpt = None) -> None:
    """Run the coordinator service in the foreground."""
    _exec_module("cairn.coordinator", home)


@app.command()
def agent(
    name: Annotated[str, typer.Argument(help="planner, researcher, writer or reviewer.")],
    home: HomeOpt = None,
) -> None:
    """Run one example agent in the foreground."""
    from .processes import EXAMPLE_AGENTS

    if name not in EXAMPLE_AGENTS:
        fail(f"unknown agent {name!r}: choose one of {', '.join(EXAMPLE_AGENTS)}")
    _exec_module(f"cairn.agents.{name}", home)


def _exec_module(module: str, home: Path | None) -> None:
    import os

    env = {**os.environ, **settings_for(home).env()}
    os.execve(sys.executable, [sys.executable, "-m", module], env)  # noqa: S606


def _run_id(settings: Settings, ref: str) -> uuid.UUID:
    """A run id from a full id, or from a unique prefix known to the views."""
    try:
        return uuid.UUID(ref)
    except ValueError:
        pass
    return uuid.UUID(_resolve(_views(settings), ref))


@app.command()
def fork(
    run: Annotated[str, typer.Argument(help="The run to fork (id or unique prefix).")],
    at: Annotated[int, typer.Option("--at", help="Fork from the state right after this event.")],
    override: Annotated[
        list[str] | None,
        typer.Option(help="STEP=FILE: take this JSON file as the step's output (repeatable)."),
    ] = None,
    set_model: Annotated[
        list[str] | None,
        typer.Option(
            "--set-model",
            help="STEP=NAME: run this step again with the model NAME (repeatable).",
        ),
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A new run from a run's state after event SEQ, without paying again for the steps done
    by then; an override replaces a step's output, a model runs a step again with another
    model, and the steps built from either run again."""
    settings = settings_for(home)
    parent = _run_id(settings, run)
    overrides: dict[str, dict[str, Any]] = {}
    for item in override or []:
        step, sep, path = item.partition("=")
        if not sep or not step or not path:
            fail(f"--override takes STEP=FILE, not {item!r}")
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            fail(f"cannot read {path}: {exc.strerror}")
        except json.JSONDecodeError as exc:
            fail(f"{path} is not valid JSON: {exc}")
        if not isinstance(data, dict):
            fail(f"{path} must hold a JSON object (the step's output)")
        overrides[step] = data
    models: dict[str, str] = {}
    for item in set_model or []:
        step, sep, model = item.partition("=")
        if not sep or not step.strip() or not model.strip():
            fail(f"--set-model takes STEP=NAME (a step and a model), not {item!r}")
        models[step.strip()] = model.strip()
    reply = send_command(
        settings, lambda client: client.fork_run(parent, at, overrides, models=models)
    )
    if not reply["ok"]:
        fail(reply["error"], code=1)
    if as_json:
        print_json(reply)
    else:
        console.print(f"forked run {parent} at event {at} as run {reply['run_id']}")


AsOpt = Annotated[str, typer.Option("--as", help="Your name, recorded as who decided.")]
ReasonOpt = Annotated[str, typer.Option(help="Why, for the record.")]


@app.command()
def approvals(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Pending approval requests, the earliest deadline first."""
    settings = settings_for(home)

    async def go() -> list[dict[str, Any]]:
        async with await CairnClient.connect(settings.nats_endpoint()) as client:
            return await client.approvals()

    pending = run_async(go())
    if as_json:
        print_json(pending)
        return
    if not pending:
        console.print("no approvals pending")
        return
    table = Table(title="pending approvals")
    for col in ("run", "step", "kind", "group", "due", "cost so far", "goal"):
        table.add_column(col)
    for a in pending:
        table.add_row(
            a["run_id"][:8], a["step"], a["kind"], a["group"], a["due_at"][:19],
            f"${a['cost_so_far_usd']}", a["goal"],
        )  # fmt: skip
    console.print(table)
    console.print("decide with: cairn approve RUN STEP --as NAME  (or cairn deny ...)")


def _decide(run: str, step: str, by: str, reason: str, home: Path | None, deny: bool) -> None:
    settings = settings_for(home)
    run_id = _run_id(settings, run)

    reply = send_command(
        settings, lambda client: client.approve(run_id, step, by, reason, deny=deny)
    )
    if not reply["ok"]:
        fail(reply["error"], code=1)
    console.print(f"{'denied' if deny else 'approved'} {step} of run {run_id} as {by}")


@app.command()
def approve(
    run: Annotated[str, typer.Argument(help="The run's id (or a unique prefix).")],
    step: Annotated[str, typer.Argument(help="The step waiting for approval.")],
    by: AsOpt,
    reason: ReasonOpt = "",
    home: HomeOpt = None,
) -> None:
    """Approve a step's pending request; the record says who and why."""
    _decide(run, step, by, reason, home, deny=False)


@app.command()
def deny(
    run: Annotated[str, typer.Argument(help="The run's id (or a unique prefix).")],
    step: Annotated[str, typer.Argument(help="The step waiting for approval.")],
    by: AsOpt,
    reason: ReasonOpt = "",
    home: HomeOpt = None,
) -> None:
    """Deny a step's pending request."""
    _decide(run, step, by, reason, home, deny=True)


budget_app = typer.Typer(help="Look at and raise a run's budget.")
app.add_typer(budget_app, name="budget")


@budget_app.command("raise")
def budget_raise(
    run: Annotated[str, typer.Argument(help="The run's id (or a unique prefix).")],
    by: AsOpt,
    usd: Annotated[str | None, typer.Option(help="The new total in USD.")] = None,
    tokens: Annotated[int | None, typer.Option(help="The new total in tokens.")] = None,
    reason: ReasonOpt = "",
    home: HomeOpt = None,
) -> None:
    """Set a run's budget to new totals; a step waiting for budget goes on."""
    settings = settings_for(home)
    run_id = _run_id(settings, run)
    try:
        amount = Decimal(usd) if usd is not None else None
    except ArithmeticError:
        fail(f"--usd must be an amount like 2.50, not {usd!r}")

    reply = send_command(
        settings, lambda client: client.raise_budget(run_id, by, amount, tokens, reason)
    )
    if not reply["ok"]:
        fail(reply["error"], code=1)
    console.print(f"budget of run {run_id} raised by {by}")


# -- reading the views ------------------------------------------------------------------------


@app.command()
def runs(
    status: Annotated[str | None, typer.Option(help="Only runs with this status.")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List runs: status, current step, cost."""
    rows = _views(settings_for(home)).runs(status=status, limit=limit)
    if as_json:
        print_json([r.model_dump(mode="json") for r in rows])
        return
    table = Table(title="runs")
    for col in ("run", "workflow", "status", "step", "steps", "cost (USD)", "started"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r.run_id)[:8],
            r.workflow,
            r.status,
            r.current_step or "",
            f"{r.steps_done}/{r.steps_total}",
            str(r.cost_usd),
            r.started_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    console.print(table)


@app.command()
def show(
    run: Annotated[str, typer.Argument(help="A run id or a unique prefix of one.")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A run's state, steps and timeline."""
    views = _views(settings_for(home))
    row = views.run(_resolve(views, run))
    assert row is not None
    steps = views.steps(str(row.run_id))
    timeline = views.timeline(str(row.run_id))
    if as_json:
        print_json(
            {
                "run": row.model_dump(mode="json"),
                "steps": [s.model_dump(mode="json") for s in steps],
                "timeline": [t.model_dump(mode="json") for t in timeline],
            }
        )
        return
    console.print(f"[bold]run {row.run_id}[/] · {row.workflow} · [bold]{row.status}[/]")
    console.print(f"goal: {row.goal}")
    console.print(f"cost: ${row.cost_usd} · attempts: {row.attempts}")
    if row.error:
        console.print(f"[red]error:[/] {row.error}")
    table = Table(title="steps")
    for col in ("step", "capability", "status", "try", "agent", "tokens in/out", "cost (USD)"):
        table.add_column(col)
    for s in steps:
        table.add_row(
            s.step, s.capability, s.status, str(s.attempt), s.agent_id or "",
            f"{s.input_tokens}/{s.output_tokens}", str(s.cost_usd),
        )  # fmt: skip
    console.print(table)
    table = Table(title="timeline")
    for col in ("seq", "time", "actor", "action", "detail"):
        table.add_column(col)
    for t in timeline:
        table.add_row(str(t.seq), t.at.strftime("%H:%M:%S.%f")[:-3], t.actor, t.action, t.detail)
    console.print(table)


@app.command()
def costs(
    by: Annotated[str, typer.Option(help="Group by run, agent, model, tenant or day.")] = "run",
    run: Annotated[str | None, typer.Option(help="Only this run (id or prefix).")] = None,
    prices: Annotated[
        Path | None,
        typer.Option(help="Recompute the amounts from the recorded tokens with this table."),
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cost totals from the recorded charges (or recomputed under another price table)."""
    if by not in ("run", "agent", "model", "tenant", "day"):
        fail("--by must be run, agent, model, tenant or day")
    reprice = None
    table_version = None
    if prices is not None:
        from .pricing import PriceTableError, load_price_table

        try:
            table = load_price_table(prices)
        except PriceTableError as exc:
            fail(str(exc))
        table_version = table.version

        def reprice(model: str, input_tokens: int, output_tokens: int) -> Decimal | None:
            usage = Usage(model=model, input_tokens=input_tokens, output_tokens=output_tokens)
            return table.charge(usage)

    views = _views(settings_for(home))
    run_id = _resolve(views, run) if run else None
    rows = views.costs(by=by, run_id=run_id, reprice=reprice)
    total = sum((r.amount_usd for r in rows), Decimal(0))
    unpriced = sum(r.unpriced for r in rows)
    if as_json:
        print_json(
            {
                "by": by,
                "rows": [r.model_dump(mode="json") for r in rows],
                "total": total,
                "price_table": table_version,
                "unpriced": unpriced,
            }
        )
        return
    title = f"costs by {by}" + (f" under price table {table_version}" if table_version else "")
    out = Table(title=title)
    for col in (by, "charges", "input tokens", "output tokens", "USD"):
        out.add_column(col)
    for r in rows:
        key = r.key[:8] if by == "run" else r.key
        out.add_row(
            key, str(r.charges), f"{r.input_tokens:,}", f"{r.output_tokens:,}", str(r.amount_usd)
        )
    out.caption = f"total ${total}" + (
        f" ({unpriced} charges of models the table does not price count as $0)" if unpriced else ""
    )
    console.print(out)


@app.command()
def tenants(
    day: Annotated[
        str | None, typer.Option(help="A UTC day as YYYY-MM-DD (default: today).")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Each tenant's daily limit (tenants.yaml) and what it was charged on a day (UTC)."""
    from datetime import UTC, date, datetime

    from .tenants import (
        ANY_TENANT,
        TenantLimitsError,
        limit_for,
        load_tenant_limits,
        tenant_limits_path,
    )

    settings = settings_for(home)
    try:
        when = date.fromisoformat(day) if day else datetime.now(UTC).date()
    except ValueError:
        fail(f"--day {day!r} is not a date: give it as YYYY-MM-DD")
    path = tenant_limits_path(settings.home)
    try:
        limits = load_tenant_limits(path)
    except TenantLimitsError as exc:
        fail(str(exc))
    charged = {r.key: r for r in _views(settings).costs(by="tenant", day=when.isoformat())}
    rows = []
    for name in sorted((set(limits) - {ANY_TENANT}) | set(charged)):
        limit = limit_for(limits, name)
        row = charged.get(name)
        spent = row.amount_usd if row else Decimal(0)
        tokens = row.input_tokens + row.output_tokens if row else 0
        rows.append(
            {
                "tenant": name,
                "daily_usd": limit.daily_usd if limit else None,
                "daily_tokens": limit.daily_tokens if limit else None,
                "charged_usd": spent,
                "tokens": tokens,
                "left_usd": (
                    limit.daily_usd - spent if limit and limit.daily_usd is not None else None
                ),
            }
        )
    if as_json:
        print_json({"day": when.isoformat(), "limits": str(path), "tenants": rows})
        return
    out = Table(title=f"tenants on {when.isoformat()} (UTC)")
    for col in ("tenant", "daily limit", "charged", "left", "tokens", "daily tokens"):
        out.add_column(col)
    for r in rows:
        out.add_row(
            str(r["tenant"]),
            "-" if r["daily_usd"] is None else f"${r['daily_usd']}",
            f"${r['charged_usd']}",
            "-" if r["left_usd"] is None else f"${r['left_usd']}",
            f"{r['tokens']:,}",
            "-" if r["daily_tokens"] is None else f"{r['daily_tokens']:,}",
        )
    out.caption = f"limits from {path}" + ("" if limits else " (no file: no tenant is limited)")
    console.print(out)


# `cairn audit` lives in cli_audit.py, with `cairn why` and `cairn projections status`.


@projections_app.command("rebuild")
def projections_rebuild(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Drop the views and rebuild them from the event log."""
    import gc
    import time

    from cairn.projections import VIEW_NAMES, ViewsUnavailableError, rebuild

    settings = settings_for(home)
    gc.collect()
    gc.freeze()  # the process's long-lived objects stay out of the collector's full passes
    started = time.perf_counter()
    try:
        count = rebuild(settings)
    except (StoreUnavailableError, ViewsUnavailableError) as exc:
        fail(str(exc))
    seconds = time.perf_counter() - started
    rate = count / seconds if seconds > 0 else 0.0
    if as_json:
        print_json(
            {
                "events": count,
                "seconds": round(seconds, 3),
                "events_per_s": round(rate),
                "views": list(VIEW_NAMES),
                "location": settings.views,
            }
        )
    else:
        console.print(
            f"rebuilt the views ({', '.join(VIEW_NAMES)}) from {count} events "
            f"in {seconds:.2f} s ({rate:,.0f} events/s) into {settings.views}",
            highlight=False,
        )


@projections_app.command("run")
def projections_run(home: HomeOpt = None) -> None:
    """Run the projection runner in the foreground."""
    _exec_module("cairn.projections", home)


def main() -> None:
    app()


# One statement, so import sorting leaves it be: each module registers its commands on `app`.
from . import cli_audit, cli_bench, cli_history, cli_nats, cli_protocol, cli_serve  # noqa: E402,F401

if __name__ == "__main__":
    # Under `python -m` this file runs as `__main__`, and the modules imported above register
    # their commands on the `app` of `cairn.coordinator.cli`, a second copy: run that one.
    from cairn.coordinator.cli import main as _package_main

    _package_main()
