"""`cairn up` as a user runs it, for the tests of the stack: the process and what it prints,
the processes it runs (found by their data directory), the `cairn` command beside it, and a
chat-completions server that answers as the offline model does but can hold a step's model
calls, so a test can kill an agent while it is in the middle of a task."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cairn.agents.llm import estimate_tokens, offline_text

READY = "Ctrl-C stops everything"


def poll(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Until `predicate()` is true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def clean_env(home: Path, **more: str) -> dict[str, str]:
    """This environment without NATS_* and CAIRN_* (but the tests' chain key), for `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAIRN_", "NATS_"))}
    env["CAIRN_CHAIN_KEY"] = os.environ["CAIRN_CHAIN_KEY"]  # the tests' one key (conftest)
    return env | {"CAIRN_HOME": str(home)} | more


def cairn(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cairn.cli", *args],
        capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip


def home_processes(home: Path) -> list[int]:
    """Live processes started for `home` (their environment names it; `cairn up`'s children
    and its nats-server inherit it), this test's own process excepted."""
    marker = f"CAIRN_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return sorted(found)


def gone(pid: int) -> bool:
    """Whether a process has ended: it no longer exists, or it is a zombie that nobody has
    reaped yet (an orphan whose new parent, in a container, may never reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


class Up:
    """A `cairn up` process in `home`, its output in `<home>/../up-N.out`."""

    count = 0

    def __init__(self, env: dict[str, str], *args: str) -> None:
        Up.count += 1
        self.home = Path(env["CAIRN_HOME"])
        self.out_path = self.home.parent / f"up-{Up.count}.out"
        self._out = self.out_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cairn.cli", "up", *args],
            stdout=self._out, stderr=subprocess.STDOUT, env=env, text=True,
        )  # fmt: skip

    def output(self) -> str:
        return self.out_path.read_text()

    def wait_for(self, text: str, timeout: float = 90) -> None:
        def seen() -> bool:
            out = self.output()
            assert text in out or self.proc.poll() is None, out
            return text in out

        poll(seen, timeout, f"cairn up to say {text!r}")

    def ready(self, timeout: float = 90) -> dict[str, int]:
        """Wait for the banner; the processes it lists, by name."""
        self.wait_for(READY, timeout)
        return {m[1]: int(m[2]) for m in re.finditer(r"^  (\S+): pid (\d+)$", self.output(), re.M)}

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._out.close()


class HeldModel:
    """A chat-completions server answering as cairn's offline model would (same text, so
    the example agents work as offline), except that calls whose system prompt starts
    with `hold` wait until `release()`."""

    def __init__(self) -> None:
        self.hold: str | None = None
        self.held = 0  # calls waiting now
        self._open = threading.Event()
        self._open.set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                system, prompt = (m["content"] for m in body["messages"])
                if outer.hold is not None and system.startswith(outer.hold):
                    outer.held += 1
                    outer._open.wait(60)
                    outer.held -= 1
                text = offline_text(system, prompt, int(body.get("max_tokens", 512)))
                reply = json.dumps(
                    {
                        "id": "chatcmpl-test",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": text}}
                        ],
                        "usage": {
                            "prompt_tokens": estimate_tokens(system) + estimate_tokens(prompt),
                            "completion_tokens": estimate_tokens(text),
                        },
                    }
                ).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except OSError:
                    pass  # the agent that asked was killed meanwhile

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def hold_calls(self, system_prefix: str) -> None:
        self.hold = system_prefix
        self._open.clear()

    def release(self) -> None:
        self.hold = None
        self._open.set()

    def close(self) -> None:
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
