"""Where cairn keeps its data and how it reaches NATS, from flags and environment variables."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from cairn.runtime.eventlog.checkpoints import ChainKey
from cairn.runtime.roles import (
    CONFIG_NAME,
    EMBEDDED_AUTH_DIR,
    PASSWORD_ENV,
    ROLE_ADMIN,
    USER_ENV,
    NatsEndpoint,
    credentials_path,
)

DEFAULT_HOME = ".cairn"
CHAIN_KEY_NAME = "chain.key"
CREDS_ENV = "CAIRN_NATS_CREDS"
TLS_CA_ENV = "CAIRN_NATS_TLS_CA"
TLS_CERT_ENV = "CAIRN_NATS_TLS_CERT"
TLS_KEY_ENV = "CAIRN_NATS_TLS_KEY"
# Outputs (and inputs built from them) whose JSON is larger are stored once, apart from events.
DEFAULT_BLOB_THRESHOLD = 16 * 1024


@dataclass(frozen=True)
class Settings:
    """Process settings shared by the coordinator, projections, agents and the CLI.

    - `home`: data directory (`--home`, `CAIRN_HOME`, default `.cairn`).
    - `nats_url`: `NATS_URL`; when unset, the URL that `cairn up`/`cairn demo` wrote to
      `<home>/nats.url` for the embedded server.
    - `store_url`: event store (`CAIRN_STORE`): a SQLite path or a PostgreSQL DSN;
      default `<home>/events.db`.
    - `views_url`: projections' views (`CAIRN_VIEWS`); default `<home>/views.db`.
    - `nats_user`/`nats_password` (`CAIRN_NATS_USER`, `CAIRN_NATS_PASSWORD`), else
      `nats_creds` (`CAIRN_NATS_CREDS`, a file `cairn nats-config` wrote): who this process
      is on NATS. Neither set: on the embedded server of this home, the role's file under
      `<home>/nats-auth`; elsewhere, no credentials.
    - `nats_tls_ca` (`CAIRN_NATS_TLS_CA`): the CA that signed the server's certificate;
      `nats_tls_cert`/`nats_tls_key` (`CAIRN_NATS_TLS_CERT`, `CAIRN_NATS_TLS_KEY`): this
      process's certificate, for servers that verify clients.

    `CAIRN_BLOB_THRESHOLD` is read by the event store itself (`blob_threshold()`), wherever
    it is opened.
    """

    home: Path
    nats_url: str | None = None
    store_url: str | None = None
    views_url: str | None = None
    nats_user: str | None = None
    nats_password: str | None = field(default=None, repr=False)
    nats_creds: Path | None = None
    nats_tls_ca: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None

    @classmethod
    def from_env(cls, home: str | Path | None = None) -> Settings:
        def path(name: str) -> Path | None:
            value = os.environ.get(name)
            return Path(value).absolute() if value else None

        return cls(
            home=Path(home or os.environ.get("CAIRN_HOME") or DEFAULT_HOME).absolute(),
            nats_url=os.environ.get("NATS_URL") or None,
            store_url=os.environ.get("CAIRN_STORE") or None,
            views_url=os.environ.get("CAIRN_VIEWS") or None,
            nats_user=os.environ.get(USER_ENV) or None,
            nats_password=os.environ.get(PASSWORD_ENV) or None,
            nats_creds=path(CREDS_ENV),
            nats_tls_ca=path(TLS_CA_ENV),
            nats_tls_cert=path(TLS_CERT_ENV),
            nats_tls_key=path(TLS_KEY_ENV),
        )

    def with_nats(self, url: str) -> Settings:
        return replace(self, nats_url=url)

    @property
    def nats_url_file(self) -> Path:
        return self.home / "nats.url"

    def resolved_nats_url(self) -> str | None:
        """NATS_URL if set, else the embedded server's URL recorded under the home."""
        return self.nats_url or self._embedded_url()

    def _embedded_url(self) -> str | None:
        try:
            return self.nats_url_file.read_text().strip() or None
        except OSError:
            return None

    @property
    def embedded_auth_dir(self) -> Path:
        return self.home / EMBEDDED_AUTH_DIR

    def nats_endpoint(self, role: str = ROLE_ADMIN) -> NatsEndpoint:
        """Where and as whom to connect; `role` picks the embedded server's credentials."""
        url = self.resolved_nats_url()
        credentials_file = self.nats_creds
        if (
            not self.nats_user
            and credentials_file is None
            and url is not None
            and url == self._embedded_url()
            and (self.embedded_auth_dir / CONFIG_NAME).exists()
        ):
            credentials_file = credentials_path(self.embedded_auth_dir, role)
        return NatsEndpoint(
            url=url,
            user=self.nats_user,
            password=self.nats_password,
            credentials_file=credentials_file,
            role=role,
            tls_ca=self.nats_tls_ca,
            tls_cert=self.nats_tls_cert,
            tls_key=self.nats_tls_key,
        )

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
        optional = {
            USER_ENV: self.nats_user,
            PASSWORD_ENV: self.nats_password,
            CREDS_ENV: self.nats_creds,
            TLS_CA_ENV: self.nats_tls_ca,
            TLS_CERT_ENV: self.nats_tls_cert,
            TLS_KEY_ENV: self.nats_tls_key,
        }
        env.update({name: str(value) for name, value in optional.items() if value})
        return env


def blob_threshold(environ: Mapping[str, str] | None = None) -> int | None:
    """`CAIRN_BLOB_THRESHOLD`: the size in bytes over which the event store keeps an output
    apart, once by its hash (default 16 KiB); `off` keeps every output inside its event.
    Raises ValueError naming the variable when it is neither."""
    env = os.environ if environ is None else environ
    raw = (env.get("CAIRN_BLOB_THRESHOLD") or "").strip()
    if not raw:
        return DEFAULT_BLOB_THRESHOLD
    if raw.lower() == "off":
        return None
    try:
        value = int(raw)
        if value < 0:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"CAIRN_BLOB_THRESHOLD must be a number of bytes (e.g. 16384) or off, not {raw!r}"
        ) from None
    return value


def chain_key(
    store_url: str, *, create: bool, environ: Mapping[str, str] | None = None
) -> ChainKey:
    """The key that signs the store's checkpoints: `CAIRN_CHAIN_KEY` (hex), else the file
    `CAIRN_CHAIN_KEY_FILE`, else `chain.key` beside a SQLite store or in the data directory
    (`CAIRN_HOME`, default `.cairn`) for PostgreSQL; the file is made (mode 0600) when missing
    and `create`. An in-memory SQLite store gets a key of its own for the process's life."""
    env = os.environ if environ is None else environ
    inline = (env.get("CAIRN_CHAIN_KEY") or "").strip()
    if inline:
        return ChainKey.from_hex(inline, "CAIRN_CHAIN_KEY")
    named = (env.get("CAIRN_CHAIN_KEY_FILE") or "").strip()
    if named:
        return ChainKey.from_file(Path(named).absolute(), create=create)
    if store_url.startswith(("postgresql://", "postgres://")):
        home = Path(env.get("CAIRN_HOME") or DEFAULT_HOME).absolute()
        return ChainKey.from_file(home / CHAIN_KEY_NAME, create=create)
    path = store_url.removeprefix("sqlite:///").removeprefix("sqlite://")
    if ":memory:" in path:
        return ChainKey(secrets.token_bytes(32))
    return ChainKey.from_file(Path(path).absolute().parent / CHAIN_KEY_NAME, create=create)
