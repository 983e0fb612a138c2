"""`cairn demo`, `cairn up` and the single services (`coordinator`, `agent`, `projections run`,
`projections rebuild`): cairn's processes started from the command line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cairn.cli.app import (
    HomeOpt,
    JsonOpt,
    app,
    console,
    err_console,
    exec_module,
    fail,
    open_views,
    print_json,
    projections_app,
    run_async,
    settings_for,
)
from cairn.cli.demo import (
    DEMO_TOPIC,
    DEMO_WORKFLOW,
    auto_approver,
    demo_intent,
    prompt_approver,
    run_and_follow,
    start_services,
    wait_for_services,
    waiting_notice,
)
from cairn.runtime.client import CairnClient
from cairn.runtime.eventlog.store import StoreUnavailableError
from cairn.runtime.homelock import Holder, HomeLock, HomeLockedError
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import Supervisor

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

    With `cairn up` already running in this home, the run goes to that stack, which is left
    running. The run stops at an approval gate before the report is written: answer the
    prompt, run `cairn approve RUN write --as NAME` from another terminal, or pass --yes."""
    settings = settings_for(home)
    try:
        result = run_async(_demo(settings, topic, as_json, timeout, yes))
    except HomeLockedError as exc:
        fail(str(exc))
    if as_json:
        print_json(result)
        return
    if result["status"] != "completed":
        fail(f"the run ended {result['status']}: {result.get('error')}", code=1)


async def _demo(
    settings: Settings, topic: str, as_json: bool, timeout: float, yes: bool
) -> dict[str, Any]:
    """Run the demo on a stack of its own, or on the `cairn up` that holds the home: a
    second stack there would share its NATS folder and SQLite files, and a user who has one
    running expects the demo's run to show up in it (its dashboard, `cairn runs`)."""
    from cairn.cli.stack import running_up

    lock = HomeLock(settings.home)
    try:
        lock.acquire("cairn demo", settings.nats_url)
    except HomeLockedError:
        holder = await asyncio.to_thread(running_up, settings.home)
        if holder is None or holder.nats_url is None:
            raise
        return await _demo_on_up(settings, holder, topic, as_json, timeout, yes)
    try:
        sup = await start_services(settings)
        try:
            lock.set_nats_url(sup.settings.resolved_nats_url())
            return await _demo_run(sup.settings, sup, topic, as_json, timeout, yes)
        finally:
            sup.stop_all()
    finally:
        lock.release()


async def _demo_on_up(
    settings: Settings, holder: Holder, topic: str, as_json: bool, timeout: float, yes: bool
) -> dict[str, Any]:
    assert holder.nats_url is not None
    if not as_json:
        console.print(
            f"[bold]cairn demo[/] · `cairn up` (pid {holder.pid}) already runs in "
            f"{settings.home}: the run goes to that stack, which stays up afterwards",
            highlight=False,
        )
    summary = await _demo_run(
        settings.with_nats(holder.nats_url), None, topic, as_json, timeout, yes
    )
    summary["stack"] = {"command": holder.command, "pid": holder.pid}
    return summary


async def _demo_run(
    settings: Settings,
    sup: Supervisor | None,
    topic: str,
    as_json: bool,
    timeout: float,
    yes: bool,
) -> dict[str, Any]:
    """The demo's run on the stack at `settings` (`sup`: the one the demo started)."""
    from cairn.cli.stack import until_answering

    show = None if as_json else console
    who = os.environ.get("USER") or "demo-user"
    if yes:
        approver = auto_approver(f"{who} (demo --yes)")
    elif sys.stdin.isatty() and not as_json:
        approver = prompt_approver(console, who)
    else:
        approver = waiting_notice(err_console)
    if show and sup is not None:
        show.print(
            f"[bold]cairn demo[/] · NATS {settings.resolved_nats_url()} · data in {settings.home}"
        )
        show.print(
            "started as separate processes: "
            + ", ".join(f"{n} (pid {p.pid})" for n, p in sup.processes.items())
        )
    client = await CairnClient.connect(settings.nats_endpoint(), "cairn-demo")
    try:
        if sup is not None:
            await wait_for_services(sup, client, timeout=30)
        else:
            await until_answering(client, 30, settings.home / "logs" / "coordinator.log")
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
    if sup is not None:
        summary["processes"] = {n: p.pid for n, p in sup.processes.items()}
        if sup.nats is not None and sup.nats.process is not None:
            summary["processes"]["nats-server"] = sup.nats.process.pid
    if show:
        _print_summary(show, summary, result.progress.output)
    return summary


def _summary(settings: Settings, run_id: uuid.UUID) -> dict[str, Any]:
    views = open_views(settings)
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
        for comment in review.get("comments", []):  # what the reviewer found
            show.print(f"  - {comment}", highlight=False)
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


CredentialsOpt = Annotated[
    Path | None,
    typer.Option(
        "--credentials",
        help="With your own NATS (NATS_URL): the directory `cairn nats-config` wrote; each "
        "process connects as its own role.",
        show_default=False,
    ),
]


ReplicasOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--replicas",
        help="NAME=COUNT: run COUNT processes of the agent NAME (e.g. researcher=2); repeatable.",
        show_default=False,
    ),
]


@app.command()
def up(
    home: HomeOpt = None, credentials: CredentialsOpt = None, replicas: ReplicasOpt = None
) -> None:
    """Start everything but a run (NATS, coordinator, projections, agents, the HTTP API) and
    keep it up until Ctrl-C, SIGTERM or a closed terminal.

    One stack per home: a second `cairn up` there says which process holds it. A process
    that crashes is started again after a pause that grows with each crash; a crash loop
    (CAIRN_RESTART_LIMIT crashes within CAIRN_RESTART_WINDOW seconds), or a process that
    says its configuration cannot work, stops everything with one sentence."""
    from cairn.cli.stack import ReplicasError, parse_replicas, run_up

    settings = settings_for(home)
    try:
        counts = parse_replicas(replicas or [])
    except ReplicasError as exc:
        fail(str(exc))
    try:
        gave_up = run_async(run_up(settings, credentials, counts, console))
    except HomeLockedError as exc:
        fail(str(exc))
    if gave_up is not None:
        fail(f"cairn up gave up: {gave_up}")
    with contextlib.suppress(OSError):  # after a hang-up there may be no terminal to tell
        console.print("stopped.")


@app.command()
def coordinator(home: HomeOpt = None) -> None:
    """Run the coordinator service in the foreground.

    On a SQLite store it holds the home, as `cairn up` does: two coordinators writing one
    SQLite file from two stacks are refused. On PostgreSQL several may run (see "Deploying")."""
    from cairn.runtime.waiting import server_address

    settings = settings_for(home)
    if server_address(settings.store) is None:
        lock = HomeLock(settings.home)
        try:
            lock.acquire("cairn coordinator", settings.resolved_nats_url())
        except HomeLockedError as exc:
            fail(str(exc))
        lock.keep_across_exec()  # the coordinator this process becomes holds it until it ends
    exec_module("cairn.coordinator", home)


@app.command()
def agent(
    name: Annotated[str, typer.Argument(help="planner, researcher, writer or reviewer.")],
    home: HomeOpt = None,
) -> None:
    """Run one example agent in the foreground."""
    from cairn.runtime.supervisor import EXAMPLE_AGENT_MODULE, EXAMPLE_AGENTS

    if name not in EXAMPLE_AGENTS:
        fail(f"unknown agent {name!r}: choose one of {', '.join(EXAMPLE_AGENTS)}")
    exec_module(EXAMPLE_AGENT_MODULE.format(name=name), home)


@projections_app.command("rebuild")
def projections_rebuild(
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    no_verify: Annotated[
        bool,
        typer.Option(
            "--no-verify",
            help="Rebuild without checking the log's chains and signed checkpoints first.",
        ),
    ] = False,
) -> None:
    """Check the event log (as `cairn verify` does), then drop the views and rebuild them from
    it. A log that does not verify is refused: views rebuilt from it would show its tampered
    figures as the record."""
    import gc
    import time

    from cairn.coordinator.history.verify import verify_store
    from cairn.projections import VIEW_NAMES, ViewsUnavailableError, rebuild
    from cairn.runtime.eventlog.store import EventStore

    settings = settings_for(home)
    verified: dict[str, Any] | None = None
    if not no_verify:
        began = time.perf_counter()
        try:
            store = EventStore(settings.store)
            try:
                reports = verify_store(store)
            finally:
                store.close()
        except StoreUnavailableError as exc:
            fail(str(exc))
        wrong = [r for r in reports if not r.ok]
        if wrong:
            first = wrong[0]
            where = "the store" if first.is_store else f"run {first.run_id}"
            fail(
                f"the event log does not verify ({len(wrong)} problem(s); {where}: "
                f"{first.problems[0].message}): the views were left as they are. "
                "See `cairn verify`; `--no-verify` rebuilds from the log as it is",
                code=1,
            )
        verified = {
            "runs": sum(1 for r in reports if not r.is_store),
            "seconds": round(time.perf_counter() - began, 3),
        }
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
                "verified": verified,
            }
        )
    else:
        checked = (
            f"the log verified ({verified['runs']} run(s) in {verified['seconds']:.2f} s); "
            if verified
            else "not verified (--no-verify); "
        )
        console.print(
            f"{checked}rebuilt the views ({', '.join(VIEW_NAMES)}) from {count} events "
            f"in {seconds:.2f} s ({rate:,.0f} events/s) into {settings.views}",
            highlight=False,
        )


@projections_app.command("run")
def projections_run(home: HomeOpt = None) -> None:
    """Run the projection runner in the foreground."""
    exec_module("cairn.projections", home)
