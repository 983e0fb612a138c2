"""One stack per home: a second `cairn up` or `cairn coordinator` there says in one sentence
who holds it and starts nothing; `cairn demo` runs on the `cairn up` it finds; a holder that
was killed does not block the next start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from upstack import Up, cairn, clean_env, home_processes, poll

from cairn.runtime.homelock import HomeLock, HomeLockedError, holder_of


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.timeout(240)
def test_a_second_stack_is_refused_and_the_demo_joins_the_first(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = clean_env(home, CAIRN_HTTP_PORT="0", COLUMNS="1000")
    up = Up(env, "--replicas", "researcher=2")
    try:
        pids = up.ready()
        assert {"agent-researcher", "agent-researcher-2"} <= set(pids)
        assert len(pids) == 8  # coordinator, projections, 5 agents, http
        holder = holder_of(home)
        assert holder is not None
        assert (holder.pid, holder.command) == (up.proc.pid, "cairn up")
        url = (home / "nats.url").read_text()
        assert holder.nats_url == url
        running = home_processes(home)
        logs = sorted((home / "logs").iterdir())

        for command in ("up", "coordinator"):
            refused = cairn(env, command, timeout=60)
            assert refused.returncode == 2, refused.stderr
            assert one_line(refused.stderr).startswith(
                f"error: {home} is in use by `cairn up` (pid {up.proc.pid}, since "
            )
            assert (
                f", NATS at {url}), so `cairn {command}` did not start: use it from other "
                f"commands with --home {home}, stop it (kill -INT {up.proc.pid}), or give "
                f"`cairn {command}` another --home"
            ) in one_line(refused.stderr)
        assert home_processes(home) == running  # nothing was started
        assert sorted((home / "logs").iterdir()) == logs  # nor a log begun

        demo = cairn(env, "demo", "--yes", "--json", timeout=120)
        assert demo.returncode == 0, demo.stderr
        summary = json.loads(demo.stdout)
        assert summary["status"] == "completed"
        assert summary["stack"] == {"command": "cairn up", "pid": up.proc.pid}
        assert "processes" not in summary  # it started none
        assert home_processes(home) == running

        run = cairn(
            env, "run", "research-report", "--input", '{"topic": "rivers"}', "--wait", "--json"
        )
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["status"] == "completed"
        assert up.proc.poll() is None
    finally:
        code = up.stop()
    assert code == 0, up.output()
    assert holder_of(home) is None


HOLDER = """
import sys
from pathlib import Path
from cairn.runtime.homelock import HomeLock
HomeLock(Path(sys.argv[1])).acquire(sys.argv[2], "nats://127.0.0.1:4222")
print("held", flush=True)
sys.stdin.read()
"""


def hold(home: Path, command: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(home), command],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline() == "held\n"
    return proc


@pytest.mark.timeout(60)
def test_a_killed_holder_does_not_block_the_next_start(tmp_path: Path) -> None:
    holder = hold(tmp_path, "cairn demo")
    try:
        found = holder_of(tmp_path)
        assert found is not None
        assert (found.pid, found.command) == (holder.pid, "cairn demo")
        with pytest.raises(HomeLockedError) as locked:
            HomeLock(tmp_path).acquire("cairn up")
        assert f"in use by `cairn demo` (pid {holder.pid}, since " in str(locked.value)
        assert "so `cairn up` did not start: wait for it to end, stop it" in str(locked.value)
        # A demo is no stack to join: `cairn up` says so, the demo too.
        env = clean_env(tmp_path, COLUMNS="1000")
        for args in (["up"], ["demo", "--yes"]):
            refused = cairn(env, *args, timeout=60)
            assert refused.returncode == 2
            assert "is in use by `cairn demo`" in refused.stderr
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.communicate(timeout=10)  # reaps it and closes its pipes
    poll(lambda: holder_of(tmp_path) is None, 10, "the kernel to release the lock")
    with HomeLock(tmp_path).acquire("cairn up") as lock:
        mine = holder_of(tmp_path)
        assert mine is not None
        assert (mine.pid, mine.command) == (os.getpid(), "cairn up")
        lock.set_nats_url("nats://127.0.0.1:4333")
        assert holder_of(tmp_path) == mine.__class__(
            mine.pid, mine.command, mine.started, "nats://127.0.0.1:4333"
        )
    assert holder_of(tmp_path) is None
