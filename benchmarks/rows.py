"""The bench's table: its rows, by section, from what was measured; a figure that could not be
measured is a row without a value that says why."""

from __future__ import annotations

import os
from typing import Any

from cairn.benchmarks.live import SEGMENTS, LiveFigures
from cairn.benchmarks.logwork import LogFigures
from cairn.benchmarks.report import Row, not_measured, number, percentile, row
from cairn.benchmarks.scale import PEERS, Scale


def step_floor(commits: list[float], live: LiveFigures) -> float | None:
    """The sum of the three limits' medians: no step can take less."""
    if not (commits and live.rtt_ms and live.publish_ms):
        return None
    return sum(percentile(v, 50) for v in (live.rtt_ms, live.publish_ms, commits))


def limit_rows(
    commits: list[float], synchronous: str, live: LiveFigures, floor: float | None
) -> list[Row]:
    why = live.errors.get("limits", "not measured")
    rows = []
    for measure, values in (
        ("NATS request/reply round trip, p50", live.rtt_ms),
        ("JetStream publish with ack, p50", live.publish_ms),
        (f"SQLite commit (WAL, synchronous={synchronous}), p50", commits),
    ):
        if values:
            spread = f"p99 {number(percentile(values, 99))} ms; {len(values):,} samples"
            rows.append(row("limits", measure, percentile(values, 50), "ms", note=spread))
        else:
            rows.append(not_measured("limits", measure, "ms", why))
    if floor is None:
        rows.append(not_measured("limits", "floor for one step (their sum)", "ms", why))
    else:
        rows.append(row("limits", "floor for one step (their sum)", floor, "ms"))
    return rows


def step_rows(scale: Scale, live: LiveFigures, floor: float | None) -> list[Row]:
    why = live.errors.get("services") or live.errors.get("per_step", "not measured")
    section = "per step"
    measure = "TaskDispatched → next TaskDispatched, p50"
    rows = []
    if live.pipeline_ms:
        values = live.pipeline_ms
        p50 = percentile(values, 50)
        note = (
            f"{scale.pipeline_runs} three-step runs one at a time ({len(values)} intervals), "
            "1 coordinator and 1 echo agent process"
        )
        rows.append(row(section, measure, p50, "ms", at_most=1.5, note=note))
        rows.append(row(section, "… p99", percentile(values, 99), "ms", at_most=10))
        if floor:
            rows.append(row(section, "p50 ÷ floor", p50 / floor, "×"))
        else:
            rows.append(not_measured(section, "p50 ÷ floor", "×", "no floor"))
        for name, values in zip(SEGMENTS, live.segments_ms, strict=False):
            if values:
                rows.append(row(section, f"… {name}, p50", percentile(values, 50), "ms"))
    else:
        rows.append(not_measured(section, measure, "ms", why, at_most=1.5))
        rows.append(not_measured(section, "… p99", "ms", why, at_most=10))
        rows.append(not_measured(section, "p50 ÷ floor", "×", why))
    measure = f"p50 within one run of {scale.chain_steps} steps"
    if live.chain_ms:
        chain = live.chain_ms
        note = (
            f"first step {number(chain[0])} ms, last {number(chain[-1])} ms, "
            f"p99 {number(percentile(chain, 99))} ms"
        )
        rows.append(row(section, measure, percentile(chain, 50), "ms", at_most=1.5, note=note))
    else:
        rows.append(not_measured(section, measure, "ms", why, at_most=1.5))

    why = live.errors.get("services") or live.errors.get("throughput", "not measured")
    measure = f"steps/s, {scale.concurrent_runs} concurrent runs, {scale.replicas} agent replicas"
    if live.steps_per_s is None:
        rows.append(not_measured("throughput", measure, "/s", why, at_least=3000))
        return rows
    t = live.throughput
    note = (
        f"three-step runs in a closed loop: {t['steps_in_window']:,} steps completed in "
        f"{t['window_s']:g} s after warm-up; {t['results_per_batch']:.1f} results per batch, "
        f"{t['commits_per_step']:.2f} commits per step"
    )
    rows.append(row("throughput", measure, live.steps_per_s, "/s", at_least=3000, note=note))
    cpu = live.cpu_ms_per_step
    total = sum(cpu.values())
    if total:
        cores = os.cpu_count() or 1
        note = f"at most {cores * 1000 / total:,.0f} steps/s on {cores} cores at this cost"
        rows.append(row("throughput", "CPU per step, all processes", total, "ms", note=note))
        for name, ms in cpu.items():
            rows.append(row("throughput", f"… {name}", ms, "ms"))
    return rows


def log_rows(log: LogFigures) -> list[Row]:
    size = f"{log.events:,} events"
    batches = f"{log.batches:,} batches of ~{log.events // max(1, log.batches)} events"
    rows = []
    for measure, value, target, error, note in (
        ("decide + evolve, in process", log.decide_per_s, None, "append", size),
        ("EventStore.append", log.append_per_s, None, "append", f"{batches}, a commit each"),
        ("projection rebuild", log.rebuild_per_s, 100_000, "rebuild", f"{size}, all views"),
        ("replay --check", log.replay_per_s, 50_000, "replay", log.replay_note),
    ):
        if value is None:
            why = log.errors.get(error) or log.errors.get("append") or log.replay_note
            rows.append(
                not_measured("log", measure, "events/s", why or "not measured", at_least=target)
            )
        else:
            rows.append(row("log", measure, value, "events/s", at_least=target, note=note))
    return rows


def memory_rows(scale: Scale, live: LiveFigures) -> list[Row]:
    why = live.errors.get("services") or live.errors.get("throughput") or "not reached"
    runs = scale.memory_runs
    rows = []
    for measure, value, note in (
        ("coordinator RSS, idle", live.rss_idle, "after start-up"),
        (
            f"coordinator RSS, {live.finished_at_sample or runs:,} finished runs",
            live.rss_finished,
            "sampled during the throughput run",
        ),
        (
            f"coordinator RSS, {live.finished_end:,} finished runs",
            live.rss_finished_end,
            "at the end of the throughput run; each step's timeout timer stays queued until "
            "it is due (60 s here), done or not",
        ),
        (
            f"coordinator RSS, + {runs:,} active runs",
            live.rss_active,
            f"{live.active_runs:,} runs active, each waiting for a capability no agent serves",
        ),
    ):
        if value is None:
            rows.append(not_measured("memory", measure, "MB", live.errors.get("active", why)))
        else:
            rows.append(row("memory", measure, value, "MB", note=note))
    measure = "growth per 1,000 more finished runs"
    more = live.finished_end - live.finished_at_sample
    if live.rss_finished is None or live.rss_finished_end is None or more < runs:
        why = f"{why}: fewer than {runs:,} runs finished after the first sample"
        rows.append(not_measured("memory", measure, "MB", why, at_most=1.0))
    else:
        growth = (live.rss_finished_end - live.rss_finished) / more * 1000
        rows.append(row("memory", measure, growth, "MB", at_most=1.0, note="flat: ≤ 1 MB"))
    return rows


def peer_rows(live: LiveFigures, peers: dict[str, dict[str, Any]]) -> list[Row]:
    cairn_p50 = percentile(live.pipeline_ms, 50) if live.pipeline_ms else None
    rows = []
    for name, label in PEERS.items():
        outcome = peers.get(name, {})
        measure = f"{label}: step → next step, p50"
        intervals = outcome.get("intervals_ms") or []
        if not outcome.get("ok") or not intervals:
            rows.append(not_measured("peers", measure, "ms", outcome.get("error", "not run")))
            continue
        p50 = percentile(intervals, 50)
        note = (
            f"{outcome.get('setup')}; mean {number(outcome['per_step_ms'])} ms a step over "
            f"{outcome['runs']} runs"
        )
        rows.append(row("peers", measure, p50, "ms", note=note))
        if cairn_p50 is None:
            rows.append(not_measured("peers", f"cairn ÷ {label}", "×", "no cairn figure"))
        else:
            note = "below 1: cairn's step is the shorter, though it crosses two processes"
            rows.append(row("peers", f"cairn ÷ {label}, p50", cairn_p50 / p50, "×", note=note))
    return rows
