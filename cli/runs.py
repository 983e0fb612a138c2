"""`cairn run`, `cancel`, `fork`, `approvals`, `approve`, `deny` and `budget raise`: commands sent
to the coordinator over NATS."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from cairn.cli.app import (
    HomeOpt,
    JsonOpt,
    app,
    console,
    err_console,
    fail,
    print_json,
    run_async,
    run_id_from,
    send_command,
    settings_for,
)
from cairn.cli.demo import (
    DemoError,
    run_and_follow,
    waiting_notice,
)
from cairn.cli.plain import plain
from cairn.coordinator.workflow import WorkflowError, load_contract_modules, load_workflow_file
from cairn.events import Budget, CommandReply, WorkflowSpec
from cairn.runtime.client import CairnClient
from cairn.runtime.settings import Settings


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
    except RecursionError:
        fail("--input nests too deeply to read")
    if not isinstance(data, dict):
        fail('--input must be a JSON object, e.g. \'{"topic": "tides"}\'')
    settings = settings_for(home)
    spec: str | WorkflowSpec = workflow
    if workflow.endswith((".yaml", ".yml")) or Path(workflow).is_file():
        try:
            load_contract_modules(settings.contract_modules)  # the file may name their contracts
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
    async with await CairnClient.connect(settings.nats_endpoint()) as connected:
        client = _Warning(connected.nc)
        if not wait:
            reply = await client.start_run(spec, data, budget=budget, tenant=tenant)
            if not reply.ok:
                raise DemoError(f"the coordinator refused the run: {reply.error}")
            if not as_json:
                console.print(f"started run {reply.run_id}")
            return {"run_id": str(reply.run_id), "status": reply.status, **client.warned}
        result = await run_and_follow(
            client, spec, data, None, None if as_json else console, timeout,
            approver=None if as_json else waiting_notice(console), budget=budget,
        )  # fmt: skip
        progress = result.progress
        if not as_json:
            console.print(f"run {result.run_id} {progress.status} in {result.seconds:.2f}s")
            if progress.error:
                console.print(plain(progress.error), style="red")
        return {
            "run_id": str(result.run_id),
            "status": progress.status,
            "output": progress.output,
            "error": progress.error,
            "cost_usd": str(progress.cost),
            "position": progress.position,
            **client.warned,
        }


class _Warning(CairnClient):
    """A client that says at once, on stderr, what the coordinator warned about when it
    started the run (a capability no live agent serves); `warned` keeps it for --json."""

    def __init__(self, nc: Any) -> None:
        super().__init__(nc)
        self.warned: dict[str, Any] = {}

    async def start_run(self, *args: Any, **kwargs: Any) -> CommandReply:
        reply = await super().start_run(*args, **kwargs)
        self.warned = {}
        if reply.ok and isinstance(reply.data, dict) and reply.data.get("warning"):
            self.warned = {"warning": reply.data["warning"], "unserved": reply.data["unserved"]}
            err_console.print(
                Text.assemble(("warning:", "bold yellow"), " ", plain(reply.data["warning"]))
            )
        return reply


@app.command()
def cancel(
    run: Annotated[str, typer.Argument(help="The run's id (or a unique prefix).")],
    reason: Annotated[str, typer.Option(help="Why, for the record.")] = "",
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a run."""
    settings = settings_for(home)
    run_id = run_id_from(settings, run)

    reply = send_command(settings, lambda client: client.cancel_run(run_id, reason))
    if as_json:
        print_json(reply)
    elif reply["ok"]:
        console.print(f"run {run_id} cancelled")
    if not reply["ok"]:
        fail(reply["error"], code=1)


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
    parent = run_id_from(settings, run)
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
        except RecursionError:
            fail(f"{path} nests too deeply to read")
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
    if isinstance(reply.get("data"), dict) and reply["data"].get("warning"):
        err_console.print(
            Text.assemble(("warning:", "bold yellow"), " ", plain(reply["data"]["warning"]))
        )
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
            f"${a['cost_so_far_usd']}", plain(a["goal"]),
        )  # fmt: skip
    console.print(table)
    console.print("decide with: cairn approve RUN STEP --as NAME  (or cairn deny ...)")


def _decide(run: str, step: str, by: str, reason: str, home: Path | None, deny: bool) -> None:
    settings = settings_for(home)
    run_id = run_id_from(settings, run)

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
    run_id = run_id_from(settings, run)
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
