"""Follow the event store's notification log into the views, exactly once.

The runner reads `EventStore.read_log` from the tracked position and hands each batch to the
views recorder, which commits the row changes and the new position together. A crash between
batches loses nothing and repeats nothing: the next runner starts from the position the last
commit recorded. When it has caught up it waits: on PostgreSQL for the store to announce an
append (LISTEN/NOTIFY, `log_notices.py`); SQLite offers no such subscription, so there it polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from types import TracebackType

from cairn.projections.errors import ProjectionConflictError
from cairn.projections.storage import ViewsRecorder, is_postgres, open_recorder
from cairn.runtime.eventlog.store import EventStore, store_env
from cairn.runtime.health import Heartbeat
from cairn.runtime.settings import Settings

log = logging.getLogger(__name__)

# The tracking name of the views in the views database. Change it (or rebuild) when the view
# tables change shape.
PROJECTION_NAME = "cairn-views"
# What that projection keeps: one fold writes all of them, in one transaction per batch.
VIEW_NAMES = ("runs", "steps", "costs", "audit")
DEFAULT_BATCH_SIZE = 1000


class ProjectionRunner:
    """Projects the log of `settings.store` into the views at `settings.views`.

    Safe to run next to other runners on the same files (a conflicting batch is rolled back
    and retried from the new position), and to call from several threads.
    """

    def __init__(self, settings: Settings, *, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.settings = settings
        self.batch_size = batch_size
        self.name = PROJECTION_NAME
        self._store = EventStore.from_settings(settings)
        try:
            self._views: ViewsRecorder = open_recorder(settings.views)
        except BaseException:
            self._store.close()
            raise
        # One batch at a time per process; `wait_for` sleeps on the condition between batches.
        self._lock = threading.Lock()
        self._advanced = threading.Condition()
        # Waits that ended because the store announced an append (PostgreSQL only).
        self.notified_wakeups = 0

    def close(self) -> None:
        """Release the database connections."""
        self._views.close()
        self._store.close()

    def __enter__(self) -> ProjectionRunner:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def position(self) -> int:
        """The last log position reflected in the views."""
        return self._views.position(self.name)

    def run_once(self) -> int:
        """Project everything logged up to now, in batches; return how many events this took."""
        target = self._store.last_position()
        done = 0
        while self.position() < target:
            count = self.run_batch()
            if count == 0:
                break
            done += count
        return done

    def run_batch(self) -> int:
        """Project at most one batch; return its size (0 when the views are up to date)."""
        with self._lock:
            while True:
                after = self.position()
                batch = self._store.read_log(after, self.batch_size)
                if not batch:
                    return 0
                try:
                    self._views.project(self.name, batch, after)
                except ProjectionConflictError as exc:
                    # Someone else committed this part of the log: start again from there.
                    log.debug("projection conflict, retrying: %s", exc)
                    continue
                break
        with self._advanced:
            self._advanced.notify_all()
        return len(batch)

    async def run(
        self, stop: asyncio.Event, poll_interval: float = 0.05, *, fallback_interval: float = 1.0
    ) -> None:
        """Keep the views up to date until `stop` is set.

        With a PostgreSQL store the runner sleeps until the store announces an append, and
        reads anyway every `fallback_interval` seconds in case a notice was lost; otherwise it
        polls every `poll_interval` seconds. Each batch runs in a worker thread, so a long
        catch-up does not stall the event loop; a batch in progress when `stop` is set is
        finished (it is one transaction either way).
        """
        heartbeat = Heartbeat(self.settings.health_file)
        if not is_postgres(self.settings.store):
            while not stop.is_set():
                count = await asyncio.to_thread(self.run_batch)
                heartbeat.beat()
                if count == 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), poll_interval)
            return
        from cairn.projections.log_notices import LogNotices

        notices = LogNotices(store_env(self.settings.store))
        await notices.start()
        try:
            while not stop.is_set():
                notices.arm()  # a notice from now on means: read again
                count = await asyncio.to_thread(self.run_batch)
                heartbeat.beat()
                if count == 0:
                    wait = fallback_interval if notices.subscribed else poll_interval
                    if await notices.wait(stop, wait):
                        self.notified_wakeups += 1
        finally:
            await notices.close()

    def wait_for(self, position: int, timeout: float = 10.0) -> int:
        """Block until the views reflect log position `position`; return the views' position.

        Wakes as soon as this runner commits a batch, and otherwise re-reads the tracked
        position every few milliseconds (another process may be doing the projecting).
        Raises TimeoutError if `timeout` seconds pass first.
        """
        deadline = time.monotonic() + timeout
        while True:
            current = self.position()
            if current >= position:
                return current
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"the views reached log position {current}, not {position}, "
                    f"within {timeout:g} s: is the projection runner running?"
                )
            with self._advanced:
                self._advanced.wait(min(remaining, 0.02))


def rebuild(settings: Settings, *, batch_size: int = DEFAULT_BATCH_SIZE) -> int:
    """Drop the views and project the whole log again; return the number of events.

    The result is identical to views kept up to date live. A runner following the same views
    meanwhile notices the reset position and continues from wherever the rebuild got to.
    """
    with ProjectionRunner(settings, batch_size=batch_size) as runner:
        runner._views.drop(runner.name, indexes=False)
        count = runner.run_once()
        runner._views.create_indexes()
        return count
