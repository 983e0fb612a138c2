"""`cairn demo` as a user runs it: embedded NATS, six service processes, one run, nothing left."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import process_alive


@pytest.mark.timeout(120)
def test_demo_runs_through_separate_processes_and_leaves_none(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "CAIRN_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "cairn.cli", "demo", "--json", "--yes",
         "--home", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["status"] == "completed"
    assert summary["output"]["report"]["sections"]
    assert Decimal(summary["cost_usd"]) > 0
    assert sum(Decimal(c["amount_usd"]) for c in summary["costs_by_model"]) == Decimal(
        summary["cost_usd"]
    )
    processes = summary["processes"]
    assert set(processes) == {
        "coordinator",
        "projections",
        "agent-planner",
        "agent-researcher",
        "agent-writer",
        "agent-reviewer",
        "nats-server",
    }
    assert len(set(processes.values())) == 7
    assert not [name for name, pid in processes.items() if process_alive(pid)]
    assert not (tmp_path / "nats.url").exists()  # the embedded server is gone, so is its URL
    # The record outlives the processes: the query commands read it without NATS.
    shown = subprocess.run(
        [sys.executable, "-m", "cairn.cli", "show", summary["run_id"], "--json",
         "--home", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["run"]["status"] == "completed"


@pytest.mark.timeout(120)
def test_demo_progress_display(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "CAIRN_"))}
    env["COLUMNS"] = "120"
    proc = subprocess.run(
        [sys.executable, "-m", "cairn.cli", "demo", "--yes", "--home", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for step in ("plan", "research", "write", "review"):
        assert step in out
    assert "✓ completed" in out
    assert "cairn show" in out
    assert "cairn costs" in out
    assert "cost: $" in out


# -- the demo's prompt, in a terminal ----------------------------------------------------------


class Terminal:
    """`cairn demo` in a pseudo-terminal: what it prints, and lines typed at it."""

    def __init__(self, home: Path) -> None:
        import fcntl
        import pty
        import struct
        import termios

        self.master, slave = pty.openpty()
        # A wide terminal, so a printed command stays on one line.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "CAIRN_"))}
        env |= {"COLUMNS": "200", "TERM": "dumb"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cairn.cli", "demo", "--home", str(home)],
            stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
        )  # fmt: skip
        os.close(slave)
        self.seen = ""

    def wait_for(self, text: str, timeout: float = 60) -> str:
        import select

        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} in:\n{self.seen[-2000:]}"
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    self.seen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the demo ended and closed the terminal
                    assert text in self.seen, f"no {text!r} in:\n{self.seen[-2000:]}"
        return self.seen

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def close(self) -> int:
        try:
            code = self.proc.wait(60)
            with contextlib.suppress(OSError):
                self.seen += os.read(self.master, 65536).decode(errors="replace")
            return code
        finally:
            os.close(self.master)


@pytest.mark.timeout(120)
def test_the_demo_prompt_shows_its_choices_and_asks_again(tmp_path: Path) -> None:
    terminal = Terminal(tmp_path)
    try:
        terminal.wait_for("approve? [y]es / [n]o:")
        terminal.type("?")  # not an answer: it asks again, nothing is decided
        terminal.wait_for("answer y to approve or n to deny (not '?')")
        terminal.type("y")
        out = terminal.wait_for("look further:")
    finally:
        code = terminal.close()
    assert code == 0, terminal.seen[-2000:]
    assert "review: approved" in out
    assert out.count("approve? [y]es / [n]o:") == 2


@pytest.mark.timeout(120)
def test_the_demo_prompt_ends_when_the_gate_is_decided_elsewhere(tmp_path: Path) -> None:
    import re

    terminal = Terminal(tmp_path)
    try:
        out = terminal.wait_for("approve? [y]es / [n]o:")
        found = re.search(r"cairn approve (\S+)\s+(\S+)\s+--as\s+NAME", out)
        assert found is not None, out
        run, step = found.groups()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "CAIRN_"))}
        approved = subprocess.run(
            [sys.executable, "-m", "cairn.cli", "approve", run, step, "--as", "maria",
             "--home", str(tmp_path)],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert approved.returncode == 0, approved.stderr
        terminal.wait_for("decided elsewhere; the run goes on")
        terminal.wait_for("look further:")
    finally:
        code = terminal.close()
    assert code == 0, terminal.seen[-2000:]
