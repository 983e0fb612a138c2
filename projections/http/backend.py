"""What the HTTP server reads and talks to: the views, the event store and NATS.

Each is opened on first use and kept, so the server starts before the projection runner or
NATS is up and answers 503 with what to start until they are; nothing is a module global.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from nats.errors import Error as NatsError
from starlette.concurrency import run_in_threadpool

from cairn.events import Event, UnknownEventError
from cairn.projections import AmbiguousRunError, RunNotFoundError, Views, ViewsUnavailableError
from cairn.projections.http.errors import ApiError
from cairn.runtime.client import CairnClient, CoordinatorUnavailableError
from cairn.runtime.connection import NatsUnavailableError, unreachable_message
from cairn.runtime.deadletters import DeadLettersUnavailableError
from cairn.runtime.eventlog.store import EventStore, StoreUnavailableError, store_env
from cairn.runtime.settings import Settings

T = TypeVar("T")


class Backend:
    """The server's connections, opened lazily; errors become ApiErrors that say what to do."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._views: Views | None = None
        self._store: EventStore | None = None
        self._client: CairnClient | None = None
        self._open_lock = threading.Lock()
        self._connect_lock = asyncio.Lock()

    # -- the views and the store (blocking; call through `read`) --------------------------------

    def views(self) -> Views:
        with self._open_lock:
            if self._views is None:
                try:
                    self._views = Views(self.settings.views)
                except ViewsUnavailableError as exc:
                    raise ApiError(503, f"{exc} (is the projection runner running?)") from None
            return self._views

    def run_events(self, run_id: uuid.UUID) -> list[Event]:
        """A run's events from the store: what the views do not keep (outputs, budget)."""
        with self._open_lock:
            if self._store is None:
                path = store_env(self.settings.store).get("SQLITE_DBNAME")
                if path is not None and not Path(path).is_file():
                    raise ApiError(
                        503,
                        f"no event store at {path}: start cairn (`cairn up`) or set CAIRN_STORE",
                    )
                try:
                    self._store = EventStore.from_settings(self.settings)
                except StoreUnavailableError as exc:
                    raise ApiError(503, str(exc)) from None
            store = self._store
        try:
            return store.load(run_id)
        except UnknownEventError as exc:
            raise ApiError(500, f"cannot read run {run_id} from the store: {exc}") from None

    async def read(self, query: Callable[[Views], T]) -> T:
        """Run a query over the views in a worker thread (they are blocking SQLite reads)."""

        def go() -> T:
            return query(self.views())

        return await run_in_threadpool(go)

    def resolve(self, views: Views, ref: str) -> str:
        """A full run id for an id or a unique prefix, or 404 / 400 saying why not."""
        try:
            return views.resolve(ref)
        except AmbiguousRunError as exc:
            raise ApiError(400, str(exc)) from None
        except RunNotFoundError as exc:
            raise ApiError(404, str(exc)) from None

    async def run_id(self, ref: str) -> uuid.UUID:
        """A run id for a command: a full id as given, or a prefix the views know."""
        text = ref.strip()
        if len(text.replace("-", "")) == 32:
            try:
                return uuid.UUID(text)
            except ValueError:
                pass
        return uuid.UUID(await self.read(lambda v: self.resolve(v, text)))

    # -- NATS ------------------------------------------------------------------------------------

    async def client(self) -> CairnClient:
        async with self._connect_lock:
            if self._client is not None and self._client.nc.is_closed:
                self._client = None
            if self._client is None:
                try:
                    self._client = await CairnClient.connect(
                        self.settings.nats_endpoint(), "cairn-http"
                    )
                except NatsUnavailableError as exc:
                    raise ApiError(503, str(exc)) from None
            return self._client

    async def ask(self, action: Callable[[CairnClient], Awaitable[T]]) -> T:
        """Send a request to the coordinator; 503 naming what is missing if nobody answers."""
        client = await self.client()
        try:
            return await action(client)
        except (CoordinatorUnavailableError, DeadLettersUnavailableError) as exc:
            raise ApiError(503, str(exc)) from None
        except NatsError as exc:
            url = self.settings.resolved_nats_url()
            raise ApiError(
                503, f"{unreachable_message(url)} ({type(exc).__name__}: {exc})"
            ) from None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        with self._open_lock:
            if self._views is not None:
                self._views.close()
                self._views = None
            if self._store is not None:
                self._store.close()
                self._store = None
