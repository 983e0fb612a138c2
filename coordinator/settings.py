"""Where cairn keeps its data and how it reaches NATS, from flags and environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_HOME = ".cairn"


@dataclass(frozen=True)
class Settings:
    """Process settings shared by the coordinator, projections, agents and the CLI.

    - `home`: data directory (`--home`, `CAIRN_HOME`, default `.cairn`).
    - `nats_url`: `NATS_URL`; when unset, the URL that `cairn up`/`cairn demo` wrote to
      `<home>/nats.url` for the embedded server.
    - `store_url`: event store (`CAIRN_STORE`): a SQLite path or a PostgreSQL DSN;
      default `<home>/events.db`.
    - `views_url`: projections' views (`CAIRN_VIEWS`); default `<home>/views.db`.
    """

    home: Path
    nats_url: str | None = None
    store_url: str | None = None
    views_url: str | None = None

    @classmethod
    def from_env(cls, home: str | Path | None = None) -> Settings:
        return cls(
            home=Path(home or os.environ.get("CAIRN_HOME") or DEFAULT_HOME).absolute(),
            nats_url=os.environ.get("NATS_URL") or None,
            store_url=os.environ.get("CAIRN_STORE") or None,
            views_url=os.environ.get("CAIRN_VIEWS") or None,
        )

    def with_nats(self, url: str) -> Settings:
        return replace(self, nats_url=url)

    @property
    def nats_url_file(self) -> Path:
        return self.home / "nats.url"

    def resolved_nats_url(self) -> str | None:
        """NATS_URL if set, else the embedded server's URL recorded under the home."""
        if self.nats_url:
            return self.nats_url
        try:
            return self.nats_url_file.read_text().strip() or None
        except OSError:
            return None

    @property
    def store(self) -> str:
        return self.store_url or str(self.home / "events.db")

    @property
    def views(self) -> str:
        return self.views_url or str(self.home / "views.db")

    def env(self) -> dict[str, str]:
        """Environment variables that hand these settings to a child process."""
        env = {"CAIRN_HOME": str(self.home), "CAIRN_STORE": self.store, "CAIRN_VIEWS": self.views}
        url = self.resolved_nats_url()
        if url:
            env["NATS_URL"] = url
        return env
