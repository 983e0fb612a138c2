"""The limits of the machine cairn runs on: a NATS request/reply round trip, a JetStream publish
with ack, a SQLite commit. No step can take less than their sum."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from nats.aio.msg import Msg

from cairn.runtime.connection import connect


async def nats_round_trips(url: str, samples: int) -> list[float]:
    """Core NATS request/reply between two connections, in ms."""
    requester = await connect(url, "cairn-bench-requester")
    responder = await connect(url, "cairn-bench-responder")
    try:

        async def answer(msg: Msg) -> None:
            await msg.respond(msg.data)

        await responder.subscribe("cairn-bench.echo", cb=answer)
        await responder.flush()
        payload = b"x" * 256
        for _ in range(20):
            await requester.request("cairn-bench.echo", payload, timeout=5)
        times = []
        for _ in range(samples):
            started = time.perf_counter()
            await requester.request("cairn-bench.echo", payload, timeout=5)
            times.append((time.perf_counter() - started) * 1000)
        return times
    finally:
        await requester.close()
        await responder.close()


async def jetstream_publishes(url: str, samples: int) -> list[float]:
    """JetStream publish with ack (file storage, a message id header as cairn sends), in ms."""
    nc = await connect(url, "cairn-bench-js")
    try:
        js = nc.jetstream()
        await js.add_stream(name="CAIRN_BENCH", subjects=["cairn-bench.js.>"])
        payload = b"x" * 512
        times = []
        for i in range(samples + 20):
            started = time.perf_counter()
            await js.publish("cairn-bench.js.t", payload, headers={"Nats-Msg-Id": f"m{i}"})
            if i >= 20:
                times.append((time.perf_counter() - started) * 1000)
        await js.delete_stream("CAIRN_BENCH")
        return times
    finally:
        await nc.close()


def sqlite_commits(path: Path, samples: int) -> tuple[list[float], str]:
    """One row inserted and committed per transaction, WAL with SQLite's default synchronous
    level (what the event store runs with: eventsourcing sets WAL and leaves synchronous
    alone), in ms; and the synchronous level seen."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        level = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(
            conn.execute("PRAGMA synchronous").fetchone()[0], "?"
        )
        conn.execute(
            "CREATE TABLE events (run TEXT, seq INTEGER, topic TEXT, state BLOB, "
            "PRIMARY KEY (run, seq))"
        )
        state = b"x" * 600
        times = []
        for i in range(samples + 20):
            started = time.perf_counter()
            conn.execute("BEGIN")
            conn.execute("INSERT INTO events VALUES (?, ?, ?, ?)", ("run", i, "T@1", state))
            conn.execute("COMMIT")
            if i >= 20:
                times.append((time.perf_counter() - started) * 1000)
        return times, level
    finally:
        conn.close()
