"""`cairn up` keeps its stack up: a child killed with SIGKILL mid-run (an agent mid-task, the
coordinator, the projection runner) is started again and the run completes; a crash loop
stops everything with one sentence; SIGHUP (a closed terminal) and SIGKILL of `cairn up`
itself leave no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import process_alive
from upstack import HeldModel, Up, cairn, clean_env, gone, home_processes, poll

from cairn.runtime.homelock import holder_of

RESEARCHER = "You are a careful researcher"
WRITER = "You write clear reports"


def start_run(env: dict[str, str], topic: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cairn.cli", "run", "research-report",
         "--input", json.dumps({"topic": topic}), "--wait", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )  # fmt: skip


def completed(run: subprocess.Popen[str]) -> str:
    out, err = run.communicate(timeout=90)
    assert run.returncode == 0, err
    result = json.loads(out)
    assert result["status"] == "completed", result
    return str(result["run_id"])


def nats_server_of(home: Path) -> int:
    (pid,) = [
        p for p in home_processes(home) if Path(f"/proc/{p}/comm").read_text() == "nats-server\n"
    ]
    return pid


@pytest.mark.timeout(240)
def test_a_child_killed_mid_run_is_restarted_and_the_run_completes(tmp_path: Path) -> None:
    model = HeldModel()
    env = clean_env(
        tmp_path / "home",
        CAIRN_LLM="openai",
        CAIRN_LLM_BASE_URL=model.base_url,
        CAIRN_LLM_API_KEY="test-key",
        CAIRN_AGENT_ACK_WAIT="2",  # a dead agent's task goes to the next one after 2 s
        CAIRN_RESULT_ACK_WAIT="2",
        CAIRN_RESTART_BACKOFF="0.2",
        CAIRN_HTTP_PORT="0",
    )
    up = Up(env)
    try:
        pids = up.ready()
        for victim, hold in (
            ("agent-researcher", RESEARCHER),  # mid-task: its model call is held
            ("coordinator", WRITER),  # while the writer works on the run's task
            ("projections", WRITER),
        ):
            model.hold_calls(hold)
            run = start_run(env, f"tides and {victim}")
            poll(lambda: model.held > 0, 60, f"a held model call before killing {victim}")
            os.kill(pids[victim], signal.SIGKILL)
            up.wait_for(f"restart: {victim} (pid {pids[victim]}) was killed by SIGKILL")
            up.wait_for(f"restart: {victim} restarted: pid ")
            model.release()
            run_id = completed(run)
            assert up.proc.poll() is None, up.output()
            shown = cairn(env, "show", run_id, "--json")
            assert shown.returncode == 0, shown.stderr

            def in_views(run_id: str = run_id) -> bool:
                shown = cairn(env, "show", run_id, "--json")
                return json.loads(shown.stdout)["run"]["status"] == "completed"

            poll(in_views, 60, "the views to show the run completed")
            others = {n: p for n, p in pids.items() if n != victim}
            assert all(process_alive(p) for p in others.values()), up.output()
            restarted = up.output().split(f"restart: {victim} restarted: pid ")[1].split()[0]
            pids[victim] = int(restarted)
        log = (tmp_path / "home" / "logs" / "agent-researcher.log").read_text()
        assert "restart 1: the previous agent-researcher" in log.splitlines()[0]
    finally:
        code = up.stop(signal.SIGINT)
        model.close()
    assert code == 0, up.output()
    assert home_processes(tmp_path / "home") == []


@pytest.mark.timeout(120)
def test_a_crash_loop_stops_everything_with_one_sentence(tmp_path: Path) -> None:
    # A contracts module that cannot be imported: the coordinator fails at every start.
    (tmp_path / "always_fails.py").write_text("raise RuntimeError('this module never loads')\n")
    home = tmp_path / "home"
    env = clean_env(
        home,
        PYTHONPATH=str(tmp_path),
        CAIRN_CONTRACTS="always_fails",
        CAIRN_RESTART_BACKOFF="0.05",
        CAIRN_RESTART_LIMIT="3",
        CAIRN_HTTP_PORT="0",
        COLUMNS="1000",  # the sentence on one line, its path unbroken
    )
    up = Up(env)
    code = up.proc.wait(90)
    up.stop()
    out = " ".join(up.output().split())
    assert code == 2, out
    assert (
        "error: cairn up gave up: the coordinator process exited with code 1 for the 3rd time "
        "within 60 s (a crash loop), so every process was stopped; its log "
        f"({home / 'logs' / 'coordinator.log'}) ends:"
    ) in out
    assert "RuntimeError: this module never loads" in out
    assert out.count("restart: coordinator restarted") == 2
    assert home_processes(home) == []
    assert not (home / "nats.url").exists()
    assert holder_of(home) is None


@pytest.mark.timeout(180)
def test_sigkill_and_sighup_of_cairn_up_leave_no_process_behind(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = clean_env(home, CAIRN_HTTP_PORT="0")
    first = Up(env)
    try:
        first.ready()
        nats = nats_server_of(home)
    finally:
        first.kill()  # SIGKILL: no handler runs
    # Its children and its nats-server follow it (they are tied to it), and its lock is free.
    poll(lambda: home_processes(home) == [], 30, "the killed stack's processes to end")
    assert gone(nats)
    assert holder_of(home) is None

    second = Up(env)
    try:
        pids = second.ready()
        nats = nats_server_of(home)
        url = (home / "nats.url").read_text()
        assert f"cairn is up · NATS {url}" in second.output()
        # A restarted HTTP server listens where the first one did.
        dashboard = (home / "http.url").read_text().strip()
        assert f"dashboard: {dashboard}/" in second.output()
        os.kill(pids["http"], signal.SIGKILL)
        second.wait_for("restart: http restarted: pid ")
        pids["http"] = int(second.output().split("restart: http restarted: pid ")[1].split()[0])

        def answers() -> bool:
            try:
                return httpx.get(f"{dashboard}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        poll(answers, 30, "the restarted dashboard to answer at its address")
    finally:
        code = second.stop(signal.SIGHUP)  # the terminal was closed
    assert code == 0, second.output()
    assert not [pid for pid in [*pids.values(), nats] if process_alive(pid)]
    assert home_processes(home) == []
    assert not (home / "nats.url").exists()
    assert not (home / "http.url").exists()
