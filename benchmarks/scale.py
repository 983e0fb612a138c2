"""What one bench measures and how much: the scales (`FULL`, `QUICK`) and the peers."""

from __future__ import annotations

from dataclasses import dataclass

PEERS = {"langgraph": "LangGraph", "dbos": "DBOS"}


@dataclass(frozen=True)
class Scale:
    """How much of each measurement one bench does."""

    name: str
    samples: int  # round trips, publishes and commits for the limits
    pipeline_runs: int  # three-step runs, one at a time: two step intervals each
    chain_steps: int  # steps of the one long run
    throughput_s: float  # seconds of the closed loop of concurrent runs
    history_events: int  # size of the generated history for the log rows
    memory_runs: int  # finished, then active runs for the memory rows
    peer_runs: int
    concurrent_runs: int = 50
    replicas: int = 4


FULL = Scale(
    "full",
    samples=1000,
    pipeline_runs=300,
    chain_steps=50,
    throughput_s=20.0,
    history_events=100_000,
    memory_runs=1000,
    peer_runs=200,
)
QUICK = Scale(
    "quick",
    samples=100,
    pipeline_runs=20,
    chain_steps=10,
    throughput_s=3.0,
    history_events=5_000,
    memory_runs=100,
    peer_runs=20,
)
