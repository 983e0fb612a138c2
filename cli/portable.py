"""`cairn export` and `cairn import`: a run's history as a portable file (JSON lines, hash chain
included) and back into an event store, checked whole before anything is written."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cairn.cli.app import HomeOpt, JsonOpt, app, err_console, fail, print_json, say, settings_for
from cairn.cli.eventstore import RunArg, open_store, run_in_store
from cairn.coordinator.history.portable import (
    PortableError,
    PortableHistory,
    export_lines,
    import_history,
    read_history,
)
from cairn.coordinator.history.verify import check_chain


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
    store = open_store(settings_for(home))
    run_id = run_in_store(store, run)
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
    store = open_store(settings, create=True)
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
        say(f"imported run {history.run_id} ({history.state.status}, {len(history.rows)} events)")


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
