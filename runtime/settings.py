"""Every `CAIRN_*` setting of every cairn process, read from flags and the environment in one place.

`Settings.from_env` is the only code that reads a `CAIRN_*` variable (a test checks it); the
modules take what they need from the `Settings` they are given, and `Settings.env()` hands it
on to the processes a supervisor starts.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

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
# Commands, approvals and the login form are small: a megabyte is far more than any needs.
DEFAULT_HTTP_MAX_BODY = 1024 * 1024
CREDS_ENV = "CAIRN_NATS_CREDS"
TLS_CA_ENV = "CAIRN_NATS_TLS_CA"
TLS_CERT_ENV = "CAIRN_NATS_TLS_CERT"
TLS_KEY_ENV = "CAIRN_NATS_TLS_KEY"
# Outputs (and inputs built from them) whose JSON is larger are stored once, apart from events.
DEFAULT_BLOB_THRESHOLD = 16 * 1024
DEFAULT_AGENT_CONCURRENCY = 4
DEFAULT_AGENT_ACK_WAIT = 30.0
DEFAULT_AGENT_MAX_DELIVER = 5
DEFAULT_AGENT_SHUTDOWN_GRACE = 20.0
LLM_KINDS = ("offline", "openai")
DEFAULT_LLM_BASE_URL = "https://api.openai.com/v1"
DEFAULT_LLM_MODEL = "gpt-4o-mini"
DEFAULT_LLM_TIMEOUT = 60.0
DEFAULT_HTTP_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8700
# A process waits this long at start for NATS (and the coordinator and the projection runner
# for a database server) before it gives up: long enough for a compose or systemd start order.
DEFAULT_START_TIMEOUT = 120.0
# `cairn up` restarts a crashed child after 1 s, 2 s, 4 s ... (at most 30 s), and gives up on a
# child that crashed 5 times within 60 s.
DEFAULT_RESTART_BACKOFF = 1.0
DEFAULT_RESTART_LIMIT = 5
DEFAULT_RESTART_WINDOW = 60.0


class SettingsError(ValueError):
    """A `CAIRN_*` variable holds a value cairn cannot use; the message names it and the fix."""


@dataclass(frozen=True)
class Settings:
    """Process settings shared by the coordinator, projections, agents, the HTTP API and the CLI.

    Where cairn keeps its data and how it reaches NATS:
    - `home`: data directory (`--home`, `CAIRN_HOME`, default `.cairn`), made absolute once
      (against the directory the command started in), as are SQLite paths in `CAIRN_STORE`
      and `CAIRN_VIEWS` and every file a variable names.
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
    - `blob_threshold` (`CAIRN_BLOB_THRESHOLD`): outputs whose JSON is larger (bytes) are
      stored once by content hash, apart from the events; default 16384; None (`off`) keeps
      every output inside its event.
    - `start_timeout` (`CAIRN_START_TIMEOUT`, seconds, default 120; 0: no limit): how long the
      coordinator, an agent and the projection runner wait at start for NATS (and the
      coordinator and the projection runner for a PostgreSQL server) before they give up.

    `cairn up`, which restarts a process that crashed:
    - `restart_backoff` (`CAIRN_RESTART_BACKOFF`, seconds, default 1): the wait before the
      first restart, doubled for each further crash within the window (at most 30 s).
    - `restart_limit` (`CAIRN_RESTART_LIMIT`, default 5) crashes of one process within
      `restart_window` (`CAIRN_RESTART_WINDOW`, seconds, default 60): a crash loop, on which
      `cairn up` gives up and stops everything.

    The coordinator:
    - `prices` (`CAIRN_PRICES`): the price table YAML; default the shipped one.
    - `tenants_file` (`CAIRN_TENANTS`): tenants' daily limits; default `<home>/tenants.yaml`
      (the `tenants` property gives the path either way).
    - `contract_modules` (`CAIRN_CONTRACTS`, comma-separated): more modules whose import
      registers output contracts.
    - `result_ack_wait` (`CAIRN_RESULT_ACK_WAIT`, seconds, default 30): how long a result
      held by a coordinator that died stays invisible to the next.
    - `outbox_save_interval` (`CAIRN_OUTBOX_SAVE_INTERVAL`, seconds, default 1, at most 60
      used): how often the outbox saves how far it published.
    - `follow_interval` (`CAIRN_FOLLOW_INTERVAL`, seconds, default 0.25): how often it takes
      in what other coordinators on the same store committed; `task_resend_after`
      (`CAIRN_TASK_RESEND_AFTER`, seconds, default 10): how long a task another coordinator
      committed may wait before this one sends it again.

    Agents:
    - `agent_concurrency` (`CAIRN_AGENT_CONCURRENCY`, default 4): parallel pull loops (the
      HTTP API also assumes it when estimating replicas); `agent_ack_wait`
      (`CAIRN_AGENT_ACK_WAIT`, seconds, default 30); `agent_max_deliver`
      (`CAIRN_AGENT_MAX_DELIVER`, default 5); `agent_shutdown_grace`
      (`CAIRN_AGENT_SHUTDOWN_GRACE`, seconds, default 20): what in-flight tasks get after
      SIGTERM. Their ranges are checked by `WorkerOptions`.
    - `log_level` (`CAIRN_LOG_LEVEL`, default INFO; an unknown level means INFO).
    - `llm` (`CAIRN_LLM`): `offline` (default) or `openai` (any chat-completions server), with
      `llm_base_url` (`CAIRN_LLM_BASE_URL`, default https://api.openai.com/v1), `llm_api_key`
      (`CAIRN_LLM_API_KEY`, needed for `openai`), `llm_model` (`CAIRN_LLM_MODEL`, default
      gpt-4o-mini), `llm_timeout` (`CAIRN_LLM_TIMEOUT`, seconds per request, default 60).

    The HTTP API (`python -m cairn.projections.http`, `cairn serve`, `cairn up`):
    - `http_host` (`CAIRN_HTTP_HOST`, default 127.0.0.1), `http_port` (`CAIRN_HTTP_PORT`;
      None: 8700, or for `cairn up` any free port when 8700 is taken).
    - `api_tokens` (`CAIRN_API_TOKENS`: the tokens as JSON or YAML text), else
      `api_tokens_file` (`CAIRN_API_TOKENS_FILE`); neither: `<home>/api-tokens.yaml`.
    - `http_max_body` (`CAIRN_HTTP_MAX_BODY`, bytes, default 1048576): a larger request body
      gets 413 before it is read.

    The event log's signed checkpoints (see `runtime/eventlog/checkpoints.py`):
    - `chain_key` (`CAIRN_CHAIN_KEY`: the key as hex), else `chain_key_file`
      (`CAIRN_CHAIN_KEY_FILE`); neither: `chain.key` beside a SQLite store, or in the data
      directory for PostgreSQL, made on first use. Every process that writes the store, and
      `cairn verify`, must have the same key.

    Each process's own, never handed to children by `env()`:
    - `health_file` (`CAIRN_HEALTH_FILE`): a file the process touches as its loop turns.
    - `crash_at` (`CAIRN_CRASH_AT=point[:count]`): for fault tests, the crash point at which
      the process kills itself, and on which pass (default the first).

    Standard variables cairn also reads where they are used: `OTEL_*` (tracing, see
    `runtime/tracing.py`), `USER` (who the first API token and the demo's commands stand for).
    No provider's own variable (such as `OPENAI_API_KEY`) is read: the key is `llm_api_key`.
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
    blob_threshold: int | None = DEFAULT_BLOB_THRESHOLD
    start_timeout: float = DEFAULT_START_TIMEOUT
    restart_backoff: float = DEFAULT_RESTART_BACKOFF
    restart_limit: int = DEFAULT_RESTART_LIMIT
    restart_window: float = DEFAULT_RESTART_WINDOW
    prices: Path | None = None
    tenants_file: Path | None = None
    contract_modules: tuple[str, ...] = ()
    result_ack_wait: float = 30.0
    outbox_save_interval: float = 1.0
    follow_interval: float = 0.25
    task_resend_after: float = 10.0
    agent_concurrency: int = DEFAULT_AGENT_CONCURRENCY
    agent_ack_wait: float = DEFAULT_AGENT_ACK_WAIT
    agent_max_deliver: int = DEFAULT_AGENT_MAX_DELIVER
    agent_shutdown_grace: float = DEFAULT_AGENT_SHUTDOWN_GRACE
    log_level: str = "INFO"
    llm: str = "offline"
    llm_base_url: str = DEFAULT_LLM_BASE_URL
    llm_api_key: str | None = field(default=None, repr=False)
    llm_model: str = DEFAULT_LLM_MODEL
    llm_timeout: float = DEFAULT_LLM_TIMEOUT
    http_host: str = DEFAULT_HTTP_HOST
    http_port: int | None = None
    api_tokens: str | None = field(default=None, repr=False)
    api_tokens_file: Path | None = None
    http_max_body: int = DEFAULT_HTTP_MAX_BODY
    chain_key: str | None = field(default=None, repr=False)
    chain_key_file: Path | None = None
    health_file: Path | None = None
    crash_at: tuple[str, int] | None = None

    def __post_init__(self) -> None:
        # Made absolute once, here: every path derived from the home (the store, the views, the
        # workflows, nats.url, the tokens) then means the same in every process and after any
        # change of directory.
        if not self.home.is_absolute():
            object.__setattr__(self, "home", self.home.absolute())

    @classmethod
    def from_env(
        cls, home: str | Path | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Settings from `environ` (default: this process's environment); `home` (a flag)
        wins over `CAIRN_HOME`. Raises SettingsError naming the first variable that holds a
        value cairn cannot use."""
        env = _Reader(os.environ if environ is None else environ)
        return cls(
            home=Path(home or env.text("CAIRN_HOME") or DEFAULT_HOME).absolute(),
            nats_url=env.text("NATS_URL"),
            store_url=env.store("CAIRN_STORE"),
            views_url=env.store("CAIRN_VIEWS"),
            nats_user=env.text(USER_ENV),
            nats_password=env.text(PASSWORD_ENV),
            nats_creds=env.path(CREDS_ENV),
            nats_tls_ca=env.path(TLS_CA_ENV),
            nats_tls_cert=env.path(TLS_CERT_ENV),
            nats_tls_key=env.path(TLS_KEY_ENV),
            blob_threshold=env.blob_threshold("CAIRN_BLOB_THRESHOLD"),
            start_timeout=env.at_least(
                "CAIRN_START_TIMEOUT", DEFAULT_START_TIMEOUT, float, 0, " of seconds"
            ),
            restart_backoff=env.at_least(
                "CAIRN_RESTART_BACKOFF", DEFAULT_RESTART_BACKOFF, float, 0, " of seconds"
            ),
            restart_limit=env.at_least("CAIRN_RESTART_LIMIT", DEFAULT_RESTART_LIMIT, int, 1),
            restart_window=env.at_least(
                "CAIRN_RESTART_WINDOW", DEFAULT_RESTART_WINDOW, float, 0, " of seconds"
            ),
            prices=env.path("CAIRN_PRICES"),
            tenants_file=env.path("CAIRN_TENANTS"),
            contract_modules=env.names("CAIRN_CONTRACTS"),
            result_ack_wait=env.number("CAIRN_RESULT_ACK_WAIT", 30.0, float, " of seconds"),
            outbox_save_interval=env.number(
                "CAIRN_OUTBOX_SAVE_INTERVAL", 1.0, float, " of seconds"
            ),
            follow_interval=env.number("CAIRN_FOLLOW_INTERVAL", 0.25, float, " of seconds"),
            task_resend_after=env.number("CAIRN_TASK_RESEND_AFTER", 10.0, float, " of seconds"),
            agent_concurrency=env.number("CAIRN_AGENT_CONCURRENCY", DEFAULT_AGENT_CONCURRENCY, int),
            agent_ack_wait=env.number("CAIRN_AGENT_ACK_WAIT", DEFAULT_AGENT_ACK_WAIT, float),
            agent_max_deliver=env.number("CAIRN_AGENT_MAX_DELIVER", DEFAULT_AGENT_MAX_DELIVER, int),
            agent_shutdown_grace=env.number(
                "CAIRN_AGENT_SHUTDOWN_GRACE", DEFAULT_AGENT_SHUTDOWN_GRACE, float
            ),
            log_level=(env.text("CAIRN_LOG_LEVEL") or "INFO").upper(),
            llm=env.llm_kind("CAIRN_LLM"),
            llm_base_url=env.text("CAIRN_LLM_BASE_URL") or DEFAULT_LLM_BASE_URL,
            llm_api_key=(env.text("CAIRN_LLM_API_KEY") or "").strip() or None,
            llm_model=env.text("CAIRN_LLM_MODEL") or DEFAULT_LLM_MODEL,
            llm_timeout=env.llm_timeout("CAIRN_LLM_TIMEOUT"),
            http_host=env.text("CAIRN_HTTP_HOST") or DEFAULT_HTTP_HOST,
            http_port=env.port("CAIRN_HTTP_PORT"),
            api_tokens=env.text("CAIRN_API_TOKENS"),
            api_tokens_file=env.path("CAIRN_API_TOKENS_FILE"),
            http_max_body=env.number(
                "CAIRN_HTTP_MAX_BODY", DEFAULT_HTTP_MAX_BODY, int, " of bytes"
            ),
            chain_key=(env.text("CAIRN_CHAIN_KEY") or "").strip() or None,
            chain_key_file=env.path("CAIRN_CHAIN_KEY_FILE"),
            health_file=env.path("CAIRN_HEALTH_FILE"),
            crash_at=env.crash_point("CAIRN_CRASH_AT"),
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

    def chain_key_for(self, store_url: str, *, create: bool) -> ChainKey:
        """The key that signs the checkpoints of the store at `store_url`: `chain_key`, else
        the file `chain_key_file`, else `chain.key` beside a SQLite store or in the data
        directory for PostgreSQL; the file is made (mode 0600) when missing and `create`. An
        in-memory SQLite store gets a key of its own for the process's life."""
        if self.chain_key:
            return ChainKey.from_hex(self.chain_key, "CAIRN_CHAIN_KEY")
        if self.chain_key_file is not None:
            return ChainKey.from_file(self.chain_key_file, create=create)
        if store_url.startswith(("postgresql://", "postgres://")):
            return ChainKey.from_file(self.home / CHAIN_KEY_NAME, create=create)
        path = store_url.removeprefix("sqlite:///").removeprefix("sqlite://")
        if ":memory:" in path:
            return ChainKey(secrets.token_bytes(32))
        return ChainKey.from_file(Path(path).absolute().parent / CHAIN_KEY_NAME, create=create)

    @property
    def tenants(self) -> Path:
        """The tenants' limits file: `CAIRN_TENANTS`, else `<home>/tenants.yaml`."""
        return self.tenants_file or self.home / "tenants.yaml"

    def env(self) -> dict[str, str]:
        """Environment variables that hand these settings to a child process: all of them
        but `health_file` and `crash_at`, which are each process's own."""
        env = {"CAIRN_HOME": str(self.home), "CAIRN_STORE": self.store, "CAIRN_VIEWS": self.views}
        url = self.resolved_nats_url()
        if url:
            env["NATS_URL"] = url
        values: dict[str, object] = {
            USER_ENV: self.nats_user,
            PASSWORD_ENV: self.nats_password,
            CREDS_ENV: self.nats_creds,
            TLS_CA_ENV: self.nats_tls_ca,
            TLS_CERT_ENV: self.nats_tls_cert,
            TLS_KEY_ENV: self.nats_tls_key,
            "CAIRN_BLOB_THRESHOLD": "off" if self.blob_threshold is None else self.blob_threshold,
            "CAIRN_START_TIMEOUT": self.start_timeout,
            "CAIRN_RESTART_BACKOFF": self.restart_backoff,
            "CAIRN_RESTART_LIMIT": self.restart_limit,
            "CAIRN_RESTART_WINDOW": self.restart_window,
            "CAIRN_PRICES": self.prices,
            "CAIRN_TENANTS": self.tenants_file,
            "CAIRN_CONTRACTS": ",".join(self.contract_modules),
            "CAIRN_RESULT_ACK_WAIT": self.result_ack_wait,
            "CAIRN_OUTBOX_SAVE_INTERVAL": self.outbox_save_interval,
            "CAIRN_FOLLOW_INTERVAL": self.follow_interval,
            "CAIRN_TASK_RESEND_AFTER": self.task_resend_after,
            "CAIRN_AGENT_CONCURRENCY": self.agent_concurrency,
            "CAIRN_AGENT_ACK_WAIT": self.agent_ack_wait,
            "CAIRN_AGENT_MAX_DELIVER": self.agent_max_deliver,
            "CAIRN_AGENT_SHUTDOWN_GRACE": self.agent_shutdown_grace,
            "CAIRN_LOG_LEVEL": self.log_level,
            "CAIRN_LLM": self.llm,
            "CAIRN_LLM_BASE_URL": self.llm_base_url,
            "CAIRN_LLM_API_KEY": self.llm_api_key,
            "CAIRN_LLM_MODEL": self.llm_model,
            "CAIRN_LLM_TIMEOUT": self.llm_timeout,
            "CAIRN_HTTP_HOST": self.http_host,
            "CAIRN_HTTP_PORT": self.http_port,
            "CAIRN_API_TOKENS": self.api_tokens,
            "CAIRN_API_TOKENS_FILE": self.api_tokens_file,
            "CAIRN_HTTP_MAX_BODY": self.http_max_body,
            "CAIRN_CHAIN_KEY": self.chain_key,
            "CAIRN_CHAIN_KEY_FILE": self.chain_key_file,
        }
        env.update({k: str(v) for k, v in values.items() if v is not None and v != ""})
        return env


N = TypeVar("N", int, float)


class _Reader:
    """Typed values out of an environment mapping; each error names its variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str) -> str | None:
        return self._env.get(name) or None

    def path(self, name: str) -> Path | None:
        value = self._env.get(name)
        return Path(value).absolute() if value else None

    def store(self, name: str) -> str | None:
        """A store's URL: a PostgreSQL DSN as given, a SQLite path made absolute."""
        value = self._env.get(name)
        if not value or "://" in value or value.startswith(":memory:"):
            return value or None
        return str(Path(value).absolute())

    def names(self, name: str) -> tuple[str, ...]:
        return tuple(n.strip() for n in (self._env.get(name) or "").split(",") if n.strip())

    def number(self, name: str, default: N, kind: Callable[[str], N], unit: str = "") -> N:
        raw = self._env.get(name)
        if not raw:
            return default
        try:
            return kind(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a number{unit}, not {raw!r}") from None

    def at_least(
        self, name: str, default: N, kind: Callable[[str], N], minimum: N, unit: str = ""
    ) -> N:
        value = self.number(name, default, kind, unit)
        if value < minimum:
            raise SettingsError(
                f"{name} must be a number{unit} no smaller than {minimum}, "
                f"not {self._env.get(name)!r}"
            )
        return value

    def blob_threshold(self, name: str) -> int | None:
        raw = (self._env.get(name) or "").strip()
        if not raw:
            return DEFAULT_BLOB_THRESHOLD
        if raw.lower() == "off":
            return None
        try:
            value = int(raw)
            if value < 0:
                raise ValueError
        except ValueError:
            raise SettingsError(
                f"{name} must be a number of bytes (e.g. 16384) or off, not {raw!r}"
            ) from None
        return value

    def llm_kind(self, name: str) -> str:
        kind = (self._env.get(name) or "offline").strip().lower()
        if kind not in LLM_KINDS:
            raise SettingsError(f"{name} must be 'offline' or 'openai', not {kind!r}")
        return kind

    def llm_timeout(self, name: str) -> float:
        raw = self._env.get(name) or str(DEFAULT_LLM_TIMEOUT)
        try:
            timeout = float(raw)
            if timeout <= 0:
                raise ValueError
        except ValueError:
            raise SettingsError(
                f"{name} must be a positive number of seconds, not {raw!r}"
            ) from None
        return timeout

    def port(self, name: str) -> int | None:
        raw = self._env.get(name)
        if not raw:
            return None
        try:
            port = int(raw)
            if not 0 <= port <= 65535:
                raise ValueError
        except ValueError:
            raise SettingsError(
                f"{name} must be a port number from 0 to 65535 (0: any free port), not {raw!r}"
            ) from None
        return port

    def crash_point(self, name: str) -> tuple[str, int] | None:
        raw = self._env.get(name)
        if not raw:
            return None
        point, _, count = raw.partition(":")
        try:
            return point, int(count or "1")
        except ValueError:
            raise SettingsError(
                f"{name} must name a crash point and, optionally, on which pass to crash "
                f"(e.g. after-commit:3), not {raw!r}"
            ) from None
