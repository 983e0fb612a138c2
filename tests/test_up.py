"""`cairn up` keeps everything running for other commands, and Ctrl-C stops every process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import process_alive

from cairn.runtime.embedded import EmbeddedNats


@pytest.mark.timeout(120)
def test_up_serves_runs_until_interrupted(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "CAIRN_"))}
    env["CAIRN_HOME"] = str(tmp_path)
    log = (tmp_path / "up.out").open("w")
    up = subprocess.Popen(
        [sys.executable, "-m", "cairn.cli", "up"],
        stdout=log, stderr=subprocess.STDOUT, env=env, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "Ctrl-C stops everything" not in (tmp_path / "up.out").read_text():
            assert up.poll() is None, (tmp_path / "up.out").read_text()
            assert time.monotonic() < deadline, "cairn up did not come up"
            time.sleep(0.05)
        out = (tmp_path / "up.out").read_text()
        pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
        assert len(pids) == 7  # NATS is not a child: coordinator, projections, 4 agents, http
        dashboard = re.search(r"dashboard: (http://127\.0\.0\.1:\d+)/", out)
        token = re.search(r"admin token \(saved in .*api-tokens\.yaml\): (\S+)", out)
        assert dashboard, out
        assert token, out
        assert (tmp_path / "api-tokens.yaml").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "nats.url").read_text().startswith("nats://127.0.0.1:")

        run = subprocess.run(
            [sys.executable, "-m", "cairn.cli", "run", "research-report",
             "--input", '{"topic": "comets"}', "--wait", "--json"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["status"] == "completed"
        listed = httpx.get(
            f"{dashboard[1]}/api/runs",
            headers={"Authorization": f"Bearer {token[1]}"},
            timeout=10,
        )
        assert listed.status_code == 200, listed.text
        assert [r["run_id"] for r in listed.json()["runs"]] == [json.loads(run.stdout)["run_id"]]
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(30)
        log.close()
    assert code == 0, (tmp_path / "up.out").read_text()
    assert not [pid for pid in pids if process_alive(pid)]
    assert not (tmp_path / "nats.url").exists()


def test_coordinator_names_an_unusable_store(tmp_path: Path, nats_server: EmbeddedNats) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    env = {**os.environ, "CAIRN_HOME": str(tmp_path), "NATS_URL": nats_server.url}
    env["CAIRN_STORE"] = str(blocker / "events.db")
    proc = subprocess.run(
        [sys.executable, "-m", "cairn.coordinator"], capture_output=True, text=True, env=env,
        timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"cannot open the event store (SQLite file {blocker / 'events.db'})" in proc.stderr


def test_store_error_names_the_file(tmp_path: Path) -> None:
    from cairn.runtime.eventlog.store import EventStore, StoreUnavailableError

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreUnavailableError, match=r"cannot open the event store \(SQLite file"):
        EventStore(str(blocker / "events.db"))
