"""The bench's three-step no-op pipeline in two peers: LangGraph (SQLite checkpointer) and DBOS
(SQLite system database), timed the way `cairn bench` times cairn: from one step's start to
the next step's start.

Each peer keeps process-wide state (DBOS is a singleton), so the bench runs each in a child
process: `python -m cairn.benchmarks.peers langgraph|dbos --runs N --dir DIR` prints
one JSON object on its last line. The peers come with the `bench` extra; without it the object
says how to install them.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

INSTALL_HINT = (
    "not installed: pip install 'cairn[bench]' (langgraph, langgraph-checkpoint-sqlite, dbos)"
)
STEPS = ("s1", "s2", "s3")
WARMUP_RUNS = 5


class PeerUnavailableError(RuntimeError):
    """The peer's packages are not installed."""


class _State(TypedDict):
    value: int


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise PeerUnavailableError(INSTALL_HINT) from None


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"


class _Clock:
    """Step start times of the timed runs."""

    def __init__(self) -> None:
        self.starts: list[list[float]] = []

    def step(self, index: int) -> None:
        if index == 0:
            self.starts.append([])
        self.starts[-1].append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        return [
            (later - earlier) * 1000
            for run in self.starts
            for earlier, later in itertools.pairwise(run)
        ]


def _timed(runs: int, clock: _Clock, one_run: Callable[[int], object]) -> dict[str, Any]:
    for i in range(WARMUP_RUNS):
        one_run(-1 - i)
    clock.starts.clear()
    started = time.perf_counter()
    for i in range(runs):
        one_run(i)
    seconds = time.perf_counter() - started
    return {
        "runs": runs,
        "steps": runs * len(STEPS),
        "seconds": seconds,
        "per_step_ms": seconds / (runs * len(STEPS)) * 1000,
        "intervals_ms": clock.intervals_ms(),
    }


def langgraph_pipeline(runs: int, folder: Path) -> dict[str, Any]:
    """Three nodes in a line, a SQLite checkpoint after each (durability "sync", so a step's
    checkpoint is on disk before the next step starts, as cairn's commit is)."""
    graph_mod = _module("langgraph.graph")
    saver_mod = _module("langgraph.checkpoint.sqlite")
    clock = _Clock()
    graph = graph_mod.StateGraph(_State)

    def node(index: int) -> Callable[[_State], _State]:
        def run(state: _State) -> _State:
            clock.step(index)
            return {"value": state["value"]}

        return run

    for index, name in enumerate(STEPS):
        graph.add_node(name, node(index))
    graph.add_edge(graph_mod.START, STEPS[0])
    for earlier, later in itertools.pairwise(STEPS):
        graph.add_edge(earlier, later)
    graph.add_edge(STEPS[-1], graph_mod.END)
    conn = sqlite3.connect(folder / "langgraph.db", check_same_thread=False)
    try:
        saver = saver_mod.SqliteSaver(conn)
        saver.setup()
        app = graph.compile(checkpointer=saver)

        def one_run(i: int) -> object:
            config = {"configurable": {"thread_id": f"run-{i}"}}
            return app.invoke({"value": i}, config, durability="sync")

        result = _timed(runs, clock, one_run)
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
        synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
    finally:
        conn.close()
    result["version"] = _version("langgraph")
    result["setup"] = (
        f"langgraph {result['version']}, SqliteSaver (journal_mode={journal}, "
        f"synchronous={synchronous}), durability=sync, in process"
    )
    return result


def dbos_pipeline(runs: int, folder: Path) -> dict[str, Any]:
    """A workflow of three steps; DBOS records each step's output in its SQLite system
    database before the next starts."""
    dbos_mod = _module("dbos")
    dbos = dbos_mod.DBOS
    clock = _Clock()
    dbos(
        config={
            "name": "cairn-bench",
            "system_database_url": f"sqlite:///{folder / 'dbos.sqlite'}",
            "log_level": "ERROR",
        }
    )

    def step(index: int) -> Callable[[int], int]:
        def run(value: int) -> int:
            clock.step(index)
            return value

        run.__name__ = run.__qualname__ = STEPS[index]
        decorated: Callable[[int], int] = dbos.step()(run)
        return decorated

    s1, s2, s3 = (step(i) for i in range(len(STEPS)))

    def pipeline(value: int) -> int:
        return s3(s2(s1(value)))

    workflow: Callable[[int], int] = dbos.workflow()(pipeline)
    dbos.launch()
    try:
        result = _timed(runs, clock, workflow)
    finally:
        dbos.destroy()
    result["version"] = _version("dbos")
    result["setup"] = f"dbos {result['version']}, SQLite system database, in process"
    return result


PEERS: dict[str, Callable[[int, Path], dict[str, Any]]] = {
    "langgraph": langgraph_pipeline,
    "dbos": dbos_pipeline,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    try:
        outcome = {"ok": True, **PEERS[args.peer](args.runs, args.dir)}
    except PeerUnavailableError as exc:
        outcome = {"ok": False, "error": str(exc)}
    except Exception as exc:  # a peer failing is a finding for the table, not a crash
        outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write("\n" + json.dumps(outcome) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
