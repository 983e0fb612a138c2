"""One stack per data directory: the lock `cairn up`, `cairn demo` and `cairn coordinator` (on
a SQLite store) take on `<home>/cairn.lock`, and who holds it.

The lock is `fcntl.flock` on that file, which the kernel releases when the holding process
ends however it ends (SIGKILL included), so a dead holder never blocks the next start. The
file also says who holds it (pid, command, start time, NATS URL) for the message a second
start prints; those details are only believed while the lock is held.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

LOCK_NAME = "cairn.lock"
ACQUIRE_TRIES = 5


@dataclass(frozen=True)
class Holder:
    """Who holds a home: the process, the command it runs, since when, and its NATS URL
    (None until its server is up, or when it runs none)."""

    pid: int
    command: str
    started: str  # ISO 8601, UTC
    nats_url: str | None = None

    def since(self) -> str:
        try:
            moment = datetime.fromisoformat(self.started).astimezone()
        except ValueError:
            return self.started
        return moment.strftime("%Y-%m-%d %H:%M:%S")


class HomeLockedError(RuntimeError):
    """The home is held by another process; the message says which and how to reach it."""

    def __init__(self, home: Path, holder: Holder | None, wanted: str) -> None:
        self.home = home
        self.holder = holder
        super().__init__(locked_message(home, holder, wanted))


def locked_message(home: Path, holder: Holder | None, wanted: str) -> str:
    """One sentence: who holds `home`, how to reach it, and what to do instead of `wanted`."""
    if holder is None:
        who = "another cairn process (it has not said which yet)"
    else:
        who = f"`{holder.command}` (pid {holder.pid}, since {holder.since()}"
        who += f", NATS at {holder.nats_url})" if holder.nats_url else ")"
    command = holder.command if holder is not None else None
    reach = {
        "cairn up": f"use it from other commands with --home {home}, ",
        "cairn demo": "wait for it to end, ",
    }.get(command or "", "")
    return (
        f"{home} is in use by {who}, so `{wanted}` did not start: {reach}stop it "
        f"(kill -INT {holder.pid if holder else 'PID'}), or give `{wanted}` another --home"
    )


class HomeLock:
    """The lock of one home, held from `acquire` until `release` or this process ends."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / LOCK_NAME
        self._fd: int | None = None
        self._holder: Holder | None = None

    def acquire(self, command: str, nats_url: str | None = None) -> HomeLock:
        """Take the lock at once or raise HomeLockedError naming its holder."""
        self.home.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        # `holder_of` takes the lock shared for an instant: a few tries tell that from a holder.
        for attempt in range(ACQUIRE_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == ACQUIRE_TRIES - 1:
                    os.close(fd)
                    raise HomeLockedError(self.home, read_holder(self.path), command) from None
                time.sleep(0.02)
        self._fd = fd
        started = datetime.now(UTC).isoformat(timespec="seconds")
        self._write(Holder(os.getpid(), command, started, nats_url))
        return self

    def set_nats_url(self, url: str | None) -> None:
        """Record the URL the stack's processes reach NATS at, once it is known."""
        if self._holder is not None:
            self._write(Holder(self._holder.pid, self._holder.command, self._holder.started, url))

    def keep_across_exec(self) -> None:
        """Let a process this one becomes (`os.execve`) go on holding the lock."""
        if self._fd is not None:
            os.set_inheritable(self._fd, True)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the only descriptor releases the flock
        self._fd = None
        self._holder = None

    def _write(self, holder: Holder) -> None:
        assert self._fd is not None
        self._holder = holder
        data = json.dumps(asdict(holder)).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def __enter__(self) -> HomeLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def read_holder(path: Path, patience: float = 1.0) -> Holder | None:
    """The details a holder wrote; None if it has not written them within `patience`
    seconds (it writes right after taking the lock)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return Holder(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            if time.monotonic() >= deadline:
                return None
        time.sleep(0.02)


def holder_of(home: Path) -> Holder | None:
    """Who holds `home` now; None when nobody does (the lock is free)."""
    path = home / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_holder(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
