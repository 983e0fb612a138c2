"""Starting cairn's services as separate OS processes and stopping every one of them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cairn.runtime.embedded import EmbeddedNats, EmbeddedServerError
from cairn.runtime.roles import (
    AGENT_ROLE_PREFIX,
    PASSWORD_ENV,
    ROLE_ADMIN,
    ROLE_COORDINATOR,
    USER_ENV,
    NatsCredentialsError,
    credentials_path,
    embedded_deployment,
)
from cairn.runtime.settings import CREDS_ENV, Settings

# The example agents that `cairn up` and `cairn demo` run, by capability; each is the module
# `cairn.agents.examples.<name>`, started by name (the supervisor never imports an agent).
EXAMPLE_AGENTS = ("planner", "researcher", "writer", "reviewer")
EXAMPLE_AGENT_MODULE = "cairn.agents.examples.{name}"


def service_modules(agents: tuple[str, ...] = EXAMPLE_AGENTS) -> dict[str, str]:
    """Process name → module run with `python -m`."""
    modules = {"coordinator": "cairn.coordinator", "projections": "cairn.projections"}
    modules.update({f"agent-{name}": EXAMPLE_AGENT_MODULE.format(name=name) for name in agents})
    return modules


def process_role(name: str) -> str | None:
    """The NATS role a supervised process connects as (None: it does not use NATS)."""
    if name == ROLE_COORDINATOR or name.startswith(AGENT_ROLE_PREFIX):
        return name
    if name == "http":
        return ROLE_ADMIN
    return None


@dataclass
class Supervisor:
    """Runs services as child processes, each logging to `<home>/logs/<name>.log`.

    `credentials`: a directory `cairn nats-config` wrote (or the embedded server's); each
    child gets its role's file as CAIRN_NATS_CREDS. Unset, children inherit this process's
    NATS settings.
    """

    settings: Settings
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    nats: EmbeddedNats | None = None
    credentials: Path | None = None
    _logs: list[IO[bytes]] = field(default_factory=list)

    def ensure_nats(self) -> str:
        """Use NATS_URL when set; otherwise start the embedded server, with a user per role
        (made once under `<home>/nats-auth`), and record its URL."""
        if self.settings.nats_url:
            return self.settings.nats_url
        try:
            auth = embedded_deployment(self.settings.home, EXAMPLE_AGENTS)
        except NatsCredentialsError as exc:
            raise EmbeddedServerError(
                f"the embedded server's users cannot be set up: {exc}"
            ) from None
        self.credentials = auth.directory
        self.nats = EmbeddedNats(self.settings.home / "nats", config=auth.config).start()
        self.settings.home.mkdir(parents=True, exist_ok=True)
        self.settings.nats_url_file.write_text(self.nats.url)
        self.settings = self.settings.with_nats(self.nats.url)
        return self.nats.url

    def start(
        self,
        name: str,
        module: str,
        extra_env: dict[str, str] | None = None,
        role: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `python -m module`; `role` (default: from the name) picks its credentials."""
        log_dir = self.settings.home / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log = (log_dir / f"{name}.log").open("ab")
        self._logs.append(log)
        env = {**os.environ, **self.settings.env(), "PYTHONUNBUFFERED": "1"}
        role = role or process_role(name)
        if self.credentials is not None and role is not None:
            # The role's own file, not whatever user this (admin) process runs as.
            env.pop(USER_ENV, None)
            env.pop(PASSWORD_ENV, None)
            env[CREDS_ENV] = str(credentials_path(self.credentials, role))
        env.update(extra_env or {})
        proc = subprocess.Popen(
            [sys.executable, "-m", module],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(Path.cwd()),
        )
        self.processes[name] = proc
        return proc

    def start_all(self, agents: tuple[str, ...] = EXAMPLE_AGENTS) -> None:
        for name, module in service_modules(agents).items():
            self.start(name, module)

    def exited(self) -> dict[str, int]:
        """Processes that have ended, with their exit codes."""
        return {n: p.returncode for n, p in self.processes.items() if p.poll() is not None}

    def log_tail(self, name: str, lines: int = 5) -> str:
        path = self.settings.home / "logs" / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop_all(self, timeout: float = 10.0) -> None:
        """SIGTERM every child, SIGKILL what is still there after `timeout`, then stop NATS."""
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self.nats is not None:
            self.nats.stop()
            try:
                if self.settings.nats_url_file.read_text().strip() == self.nats.url:
                    self.settings.nats_url_file.unlink()
            except OSError:
                pass
            self.nats = None
