"""cairn's services as child processes: starting them, restarting the ones that crash, and
stopping every one of them.

`Supervisor` starts children (`python -m MODULE`, each logging to `<home>/logs/<name>.log`)
and stops them all; by default it does no more, so tests and the bench start and kill
children themselves. `cairn up` asks for more: `keep_logs` (each start writes a fresh log,
the previous few are kept as `<name>.log.1` ...), `tied` children (see `tether`: they die with
this process) and `watch(policy)`, called as its loop turns, which restarts a crashed child
(the embedded nats-server included) after a growing pause and gives up on a crash loop, or on
a child whose exit status 2 says its configuration cannot work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO

from cairn.runtime.embedded import EmbeddedNats, EmbeddedServerError
from cairn.runtime.restarts import record_restart
from cairn.runtime.roles import (
    PASSWORD_ENV,
    ROLE_ADMIN,
    ROLE_COORDINATOR,
    USER_ENV,
    NatsCredentialsError,
    agent_role,
    credentials_path,
    embedded_deployment,
)
from cairn.runtime.settings import CREDS_ENV, Settings
from cairn.runtime.tether import tethered

# The example agents that `cairn up` and `cairn demo` run, by capability; each is the module
# `cairn.agents.examples.<name>`, started by name (the supervisor never imports an agent).
EXAMPLE_AGENTS = ("planner", "researcher", "writer", "reviewer")
EXAMPLE_AGENT_MODULE = "cairn.agents.examples.{name}"
NATS_NAME = "nats-server"
# cairn's processes exit with 2 when their configuration cannot work (a bad setting, a store
# that cannot be opened, NATS still unreachable after CAIRN_START_TIMEOUT): starting them
# again would only fail again.
CONFIG_EXIT = 2
LONGEST_BACKOFF = 30.0


def service_processes(
    agents: tuple[str, ...] = EXAMPLE_AGENTS, replicas: Mapping[str, int] | None = None
) -> dict[str, tuple[str, str | None]]:
    """Process name → (module run with `python -m`, NATS role). An agent's replicas are
    `agent-<capability>`, `agent-<capability>-2`, ..., all in the capability's role."""
    processes: dict[str, tuple[str, str | None]] = {
        "coordinator": ("cairn.coordinator", ROLE_COORDINATOR),
        "projections": ("cairn.projections", None),
    }
    for capability in agents:
        module = EXAMPLE_AGENT_MODULE.format(name=capability)
        for replica in range(1, (replicas or {}).get(capability, 1) + 1):
            name = f"agent-{capability}" + (f"-{replica}" if replica > 1 else "")
            processes[name] = (module, agent_role(capability))
    return processes


def service_modules(agents: tuple[str, ...] = EXAMPLE_AGENTS) -> dict[str, str]:
    """Process name → module run with `python -m` (one replica per agent)."""
    return {name: module for name, (module, _) in service_processes(agents).items()}


def process_role(name: str) -> str | None:
    """The NATS role a supervised process connects as (None: it does not use NATS)."""
    if name == ROLE_COORDINATOR or name.startswith("agent-"):
        return name
    if name == "http":
        return ROLE_ADMIN
    return None


def describe_exit(code: int) -> str:
    """`exited with code 1`, `was killed by SIGKILL`."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def rotate(path: Path, keep: int) -> None:
    """Move `path` to `path.1`, `path.1` to `path.2` ... keeping `keep` old files."""
    if not path.exists():
        return
    if keep < 1:
        path.unlink()
        return
    for older in range(keep - 1, 0, -1):
        source = path.with_name(f"{path.name}.{older}")
        if source.exists():
            source.replace(path.with_name(f"{path.name}.{older + 1}"))
    path.replace(path.with_name(f"{path.name}.1"))


@dataclass(frozen=True)
class RestartPolicy:
    """Restart a crashed child after `backoff` seconds, doubled for each further crash
    within `window` (at most LONGEST_BACKOFF); the `limit`-th crash within `window` is a
    crash loop."""

    backoff: float = 1.0
    limit: int = 5
    window: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RestartPolicy:
        return cls(settings.restart_backoff, settings.restart_limit, settings.restart_window)

    def delay(self, crashes: int) -> float:
        return float(min(LONGEST_BACKOFF, self.backoff * 2 ** max(0, crashes - 1)))


@dataclass(frozen=True)
class ChildSpec:
    """How a child was started, so that it can be started again the same way."""

    module: str
    env: dict[str, str]
    role: str | None


@dataclass(frozen=True)
class Crashed:
    """A child ended without being asked to; it starts again after `delay` seconds."""

    name: str
    pid: int
    code: int
    crashes: int  # within the policy's window, this one included
    delay: float
    log: Path  # the log of the start that ended

    def message(self, policy: RestartPolicy) -> str:
        return (
            f"{self.name} (pid {self.pid}) {describe_exit(self.code)}; restarting it in "
            f"{self.delay:g} s (crash {self.crashes} within {policy.window:g} s; the "
            f"{ordinal(policy.limit)} stops everything; its log: {self.log})"
        )


@dataclass(frozen=True)
class Restarted:
    name: str
    pid: int
    restarts: int  # of this name since the supervisor began

    def message(self) -> str:
        return f"{self.name} restarted: pid {self.pid} (restart {self.restarts})"


class GaveUpError(RuntimeError):
    """A child crashed in a loop, or said its configuration cannot work; the message says
    which, how it ended and the end of its log."""

    def __init__(self, name: str, code: int, reason: str, log: Path, tail: str) -> None:
        self.name = name
        self.code = code
        self.log = log
        super().__init__(
            f"the {name} process {describe_exit(code)}{reason}, so every process was stopped; "
            f"its log ({log}) ends:\n{tail}"
        )


@dataclass
class Supervisor:
    """Runs services as child processes, each logging to `<home>/logs/<name>.log`.

    `credentials`: a directory `cairn nats-config` wrote (or the embedded server's); each
    child gets its role's file as CAIRN_NATS_CREDS. Unset, children inherit this process's
    NATS settings. `keep_logs`: each start of a child writes a fresh log and this many
    earlier ones are kept (None: one log per name, appended to). `tied`: children and the
    embedded server die with this process (start them from the main thread, see `tether`).
    """

    settings: Settings
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    nats: EmbeddedNats | None = None
    credentials: Path | None = None
    keep_logs: int | None = None
    tied: bool = False
    specs: dict[str, ChildSpec] = field(default_factory=dict)
    restarts: Counter[str] = field(default_factory=Counter)
    _logs: dict[str, IO[bytes]] = field(default_factory=dict)
    _crashes: dict[str, deque[float]] = field(default_factory=dict)
    _due: dict[str, float] = field(default_factory=dict)
    _ended: dict[str, tuple[int, int, Path]] = field(default_factory=dict)
    _stopped: bool = False  # by stop_all: what ends from then on was asked to

    def ensure_nats(self, agents: tuple[str, ...] = EXAMPLE_AGENTS) -> str:
        """Use NATS_URL when set; otherwise start the embedded server, with a user per role
        (made once under `<home>/nats-auth`), and record its URL."""
        if self.settings.nats_url:
            return self.settings.nats_url
        try:
            auth = embedded_deployment(self.settings.home, agents)
        except NatsCredentialsError as exc:
            raise EmbeddedServerError(
                f"the embedded server's users cannot be set up: {exc}"
            ) from None
        self.credentials = auth.directory
        store_dir = self.settings.home / "nats"
        if self.keep_logs is not None:
            rotate(store_dir / "nats-server.log", self.keep_logs)
        self.nats = EmbeddedNats(store_dir, config=auth.config, tied=self.tied).start()
        self.settings.home.mkdir(parents=True, exist_ok=True)
        self.settings.nats_url_file.write_text(self.nats.url)
        self.settings = self.settings.with_nats(self.nats.url)
        return self.nats.url

    def log_path(self, name: str) -> Path:
        if name == NATS_NAME and self.nats is not None:
            return self.nats.log_path
        return self.settings.home / "logs" / f"{name}.log"

    def start(
        self,
        name: str,
        module: str,
        extra_env: dict[str, str] | None = None,
        role: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `python -m module`; `role` (default: from the name) picks its credentials."""
        self.specs[name] = ChildSpec(module, dict(extra_env or {}), role or process_role(name))
        self._stopped = False
        return self._launch(name, "started")

    def _launch(self, name: str, note: str) -> subprocess.Popen[bytes]:
        spec = self.specs[name]
        path = self.log_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if name in self._logs:
            self._logs.pop(name).close()
        if self.keep_logs is not None:
            rotate(path, self.keep_logs)
        log = path.open("ab")
        self._logs[name] = log
        if self.keep_logs is not None:
            log.write(f"-- {datetime.now().isoformat(timespec='seconds')} {note} --\n".encode())
            log.flush()
        env = {**os.environ, **self.settings.env(), "PYTHONUNBUFFERED": "1"}
        if self.credentials is not None and spec.role is not None:
            # The role's own file, not whatever user this (admin) process runs as.
            env.pop(USER_ENV, None)
            env.pop(PASSWORD_ENV, None)
            env[CREDS_ENV] = str(credentials_path(self.credentials, spec.role))
        env.update(spec.env)
        proc = subprocess.Popen(
            [sys.executable, "-m", spec.module],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(Path.cwd()),
            **(tethered() if self.tied else {}),
        )
        self.processes[name] = proc
        return proc

    def start_all(
        self, agents: tuple[str, ...] = EXAMPLE_AGENTS, replicas: Mapping[str, int] | None = None
    ) -> None:
        for name, (module, role) in service_processes(agents, replicas).items():
            self.start(name, module, role=role)

    def exited(self) -> dict[str, int]:
        """Processes that have ended, with their exit codes."""
        return {n: p.returncode for n, p in self.processes.items() if p.poll() is not None}

    def log_tail(self, name: str, lines: int = 5) -> str:
        return tail(self.log_path(name), lines)

    # -- restarts ------------------------------------------------------------------------------

    def watch(self, policy: RestartPolicy) -> list[Crashed | Restarted]:
        """Notice children that ended and start again those whose pause is over; what
        happened, in order. Raises GaveUpError on a crash loop or a configuration exit (the
        caller then stops everything)."""
        if self._stopped:
            return []
        now = time.monotonic()
        happened: list[Crashed | Restarted] = []
        for name, proc in list(self.processes.items()):
            if name not in self._due and proc.poll() is not None:
                happened.append(self._crashed(name, proc.pid, proc.returncode, policy, now))
        server = self.nats.process if self.nats is not None else None
        if server is not None and NATS_NAME not in self._due and server.poll() is not None:
            happened.append(self._crashed(NATS_NAME, server.pid, server.returncode, policy, now))
        # NATS first: the others reconnect to it by themselves.
        for name in sorted(self._due, key=lambda n: (n != NATS_NAME, self._due[n])):
            if self._due[name] <= now:
                del self._due[name]
                happened.append(self._restart(name, policy))
        return happened

    def _crashed(
        self, name: str, pid: int, code: int, policy: RestartPolicy, now: float
    ) -> Crashed:
        path = self.log_path(name)
        ending = tail(path, 10)
        if code == CONFIG_EXIT and name != NATS_NAME:
            raise GaveUpError(name, code, ", which says it cannot run as configured", path, ending)
        times = self._crashes.setdefault(name, deque())
        times.append(now)
        while times[0] < now - policy.window:
            times.popleft()
        if len(times) >= policy.limit:
            raise GaveUpError(
                name,
                code,
                f" for the {ordinal(len(times))} time within {policy.window:g} s (a crash loop)",
                path,
                ending,
            )
        if name in self._logs:
            self._logs.pop(name).close()
        kept = path
        if self.keep_logs is not None and self.keep_logs > 0:
            rotate(path, self.keep_logs)  # now, so the message can name where it is kept
            kept = path.with_name(f"{path.name}.1")
        delay = policy.delay(len(times))
        self._due[name] = now + delay
        self._ended[name] = (pid, code, kept)
        return Crashed(name, pid, code, len(times), delay, kept)

    def _restart(self, name: str, policy: RestartPolicy) -> Crashed | Restarted:
        self.restarts[name] += 1
        pid, code, kept = self._ended[name]
        record_restart(self.settings.home, name, self.restarts[name], describe_exit(code))
        if name == NATS_NAME:
            assert self.nats is not None
            old = self.nats
            # The same port and store: clients reconnect by themselves, nats.url stays true.
            self.nats = EmbeddedNats(old.store_dir, port=old.port, config=old.config, tied=old.tied)
            try:
                self.nats.start()
            except EmbeddedServerError:
                server = self.nats.process
                self.nats.stop()
                failed = server.poll() if server is not None else None
                return self._crashed(
                    NATS_NAME, server.pid if server else 0, failed or 1, policy, time.monotonic()
                )
            assert self.nats.process is not None
            return Restarted(name, self.nats.process.pid, self.restarts[name])
        note = (
            f"restart {self.restarts[name]}: the previous {name} (pid {pid}) "
            f"{describe_exit(code)}; its log is {kept.name}"
        )
        return Restarted(name, self._launch(name, note).pid, self.restarts[name])

    # -- stopping ------------------------------------------------------------------------------

    def stop_all(self, timeout: float = 10.0) -> None:
        """SIGTERM every child, SIGKILL what is still there after `timeout`, then stop NATS."""
        self._stopped = True
        self._due.clear()
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
        for log in self._logs.values():
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


def tail(path: Path, lines: int = 5) -> str:
    """The last `lines` lines of a text file ("" when there is none)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
