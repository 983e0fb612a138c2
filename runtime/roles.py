"""NATS users for cairn's roles: what each may publish and subscribe to, their credentials
files, and the nats-server configuration that holds them.

Roles: `coordinator` (everything cairn's own service needs), `admin` (the CLI and the HTTP
API: commands and the event feed), `observer` (the event feed and read-only queries) and
`agent-<capability>` (its own consumer of tasks, results, acks, its dead letters). Every user
receives replies only under its own inbox prefix `_INBOX.<user>`, so no role can read another's
replies — pull responses carrying tasks and results among them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cairn.events import (
    CMD_APPROVALS,
    CMD_PING,
    DLQ_STREAM,
    TASKS_STREAM,
    agent_consumer,
    dlq_subject,
    stream_configs,
    task_subject,
)
from cairn.events.protocol import SUBJECT_PREFIX

ROLE_COORDINATOR = "coordinator"
ROLE_ADMIN = "admin"
ROLE_OBSERVER = "observer"
AGENT_ROLE_PREFIX = "agent-"
BASE_ROLES = (ROLE_COORDINATOR, ROLE_ADMIN, ROLE_OBSERVER)

CONFIG_NAME = "nats-server.conf"
CREDENTIALS_SUFFIX = ".env"
# Where `cairn up` and `cairn demo` keep the embedded server's users, under the home.
EMBEDDED_AUTH_DIR = "nats-auth"

USER_ENV = "CAIRN_NATS_USER"
PASSWORD_ENV = "CAIRN_NATS_PASSWORD"  # noqa: S105 (the variable's name, not a password)

# A capability is one subject token and part of a user name (as in `cairn.agents.base`).
_CAPABILITY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class NatsCredentialsError(RuntimeError):
    """A credentials file is missing or malformed, or a role is unknown; says which and why."""


def agent_role(capability: str) -> str:
    return f"{AGENT_ROLE_PREFIX}{capability}"


def inbox_prefix(user: str) -> str:
    """The reply-subject prefix a user's connection uses (and the only one it may read)."""
    return f"_INBOX.{user}"


def check_capability(capability: str) -> str:
    if not _CAPABILITY.match(capability):
        raise NatsCredentialsError(
            f"{capability!r} is not a capability name: use letters, digits, '-' or '_' "
            "(it becomes the subject cairn.task.<capability>)"
        )
    return capability


@dataclass(frozen=True)
class Permissions:
    """Subjects a user may publish and subscribe to; `allow_responses` lets it answer requests
    sent to it without a publish grant on the requesters' inboxes."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False


def coordinator_permissions() -> Permissions:
    """Streams, consumers, tasks, events, dead letters, and answering commands."""
    return Permissions(
        publish=(f"{SUBJECT_PREFIX}.>", "$JS.API.>", "$JS.ACK.>"),
        subscribe=(f"{SUBJECT_PREFIX}.cmd.>", f"{inbox_prefix(ROLE_COORDINATOR)}.>"),
        allow_responses=True,
    )


# Reading the dead letters back (counts by subject, then one message at a time); nothing more.
_READ_DEAD_LETTERS = (f"$JS.API.STREAM.INFO.{DLQ_STREAM}", f"$JS.API.STREAM.MSG.GET.{DLQ_STREAM}")


def admin_permissions() -> Permissions:
    """Commands, the event feed, which agents are live (consumer info on the tasks), and
    reading the dead letters."""
    return Permissions(
        publish=(
            f"{SUBJECT_PREFIX}.cmd.>",
            f"$JS.API.CONSUMER.LIST.{TASKS_STREAM}",
            f"$JS.API.CONSUMER.INFO.{TASKS_STREAM}.*",
            *_READ_DEAD_LETTERS,
        ),
        subscribe=(f"{SUBJECT_PREFIX}.event.>", f"{inbox_prefix(ROLE_ADMIN)}.>"),
    )


def observer_permissions() -> Permissions:
    """The event feed and the read-only queries (ping, pending approvals, agents, dead
    letters)."""
    return Permissions(
        publish=(
            CMD_PING,
            CMD_APPROVALS,
            f"$JS.API.CONSUMER.LIST.{TASKS_STREAM}",
            f"$JS.API.CONSUMER.INFO.{TASKS_STREAM}.*",
            *_READ_DEAD_LETTERS,
        ),
        subscribe=(f"{SUBJECT_PREFIX}.event.>", f"{inbox_prefix(ROLE_OBSERVER)}.>"),
    )


def agent_permissions(capability: str) -> Permissions:
    """Pull from the capability's own consumer, ack its messages, publish results.

    The consumer may be created only under its own name and with its own task subject as the
    filter (the server checks the subject's filter against the request's). Streams belong to
    the coordinator: an agent may look them up (to wait for them) but not create, change or
    delete them.
    """
    check_capability(capability)
    consumer = agent_consumer(capability)
    return Permissions(
        publish=(
            *(f"$JS.API.STREAM.INFO.{s['name']}" for s in stream_configs()),
            f"$JS.API.CONSUMER.INFO.{TASKS_STREAM}.{consumer}",
            f"$JS.API.CONSUMER.CREATE.{TASKS_STREAM}.{consumer}.{task_subject(capability)}",
            f"$JS.API.CONSUMER.MSG.NEXT.{TASKS_STREAM}.{consumer}",
            f"$JS.ACK.{TASKS_STREAM}.{consumer}.>",
            f"{SUBJECT_PREFIX}.result.{capability}.>",
            dlq_subject(f"agent.{capability}"),
        ),
        subscribe=(f"{inbox_prefix(agent_role(capability))}.>",),
    )


def role_permissions(role: str) -> Permissions:
    if role == ROLE_COORDINATOR:
        return coordinator_permissions()
    if role == ROLE_ADMIN:
        return admin_permissions()
    if role == ROLE_OBSERVER:
        return observer_permissions()
    if role.startswith(AGENT_ROLE_PREFIX):
        return agent_permissions(role.removeprefix(AGENT_ROLE_PREFIX))
    raise NatsCredentialsError(
        f"unknown NATS role {role!r}: use coordinator, admin, observer or agent-<capability>"
    )


def roles_for(capabilities: Iterable[str]) -> list[str]:
    return [*BASE_ROLES, *(agent_role(check_capability(c)) for c in dict.fromkeys(capabilities))]


# -- credentials files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """One role's user and password. The file is an env file (`CAIRN_NATS_USER=...`), so it
    serves as `CAIRN_NATS_CREDS=<file>` and as a container's `env_file` alike."""

    user: str
    password: str = field(repr=False)

    @classmethod
    def generate(cls, user: str) -> Credentials:
        return cls(user, secrets.token_urlsafe(24))

    @classmethod
    def read(cls, path: Path) -> Credentials:
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise NatsCredentialsError(
                f"no NATS credentials file at {path}: write one with "
                "`cairn nats-config --out DIR`, or point CAIRN_NATS_CREDS at yours"
            ) from None
        except OSError as exc:
            raise NatsCredentialsError(
                f"cannot read the NATS credentials file {path}: {exc.strerror}"
            ) from None
        values: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and not key.startswith("#"):
                values[key.strip()] = value.strip().strip("'\"")
        user, password = values.get(USER_ENV), values.get(PASSWORD_ENV)
        if not user or not password:
            raise NatsCredentialsError(
                f"{path} is not a cairn NATS credentials file: it needs {USER_ENV}=... and "
                f"{PASSWORD_ENV}=... lines (`cairn nats-config` writes them)"
            )
        return cls(user, password)

    def write(self, path: Path, role: str) -> None:
        """Write owner-only (0600) from the first byte: the file holds a secret."""
        text = (
            f"# cairn NATS credentials for the role {role}: keep this file private.\n"
            f"{USER_ENV}={self.user}\n"
            f"{PASSWORD_ENV}={self.password}\n"
        )
        _write_private(path, text)


def credentials_path(directory: Path, role: str) -> Path:
    return directory / f"{role}{CREDENTIALS_SUFFIX}"


@dataclass(frozen=True)
class NatsEndpoint:
    """How one process reaches NATS: the URL, whose credentials, and TLS files.

    Credentials come as a user and password, or as a credentials file read when connecting;
    `role` only names the role in error messages.
    """

    url: str | None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    credentials_file: Path | None = None
    role: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def credentials(self) -> Credentials | None:
        if self.user:
            return Credentials(self.user, self.password or "")
        if self.credentials_file is not None:
            return Credentials.read(self.credentials_file)
        return None


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- the server's configuration ------------------------------------------------------------------


@dataclass(frozen=True)
class ServerOptions:
    """What the config says besides the users. None leaves a setting to the command line
    (the embedded server gets its address, ports and store there)."""

    listen: str | None = None
    monitor: str | None = None
    store_dir: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # set: clients must present a certificate signed by this CA


_TLS_EXAMPLE = """\
# TLS: uncomment (or run `cairn nats-config --tls-cert FILE --tls-key FILE`) and point cairn's
# processes at tls://HOST:PORT with CAIRN_NATS_TLS_CA=<the CA that signed the server's cert>.
# tls {
#   cert_file: "/etc/nats/server-cert.pem"
#   key_file: "/etc/nats/server-key.pem"
#   # ca_file: "/etc/nats/ca.pem"   # with verify: clients need a certificate signed by it
#   # verify: true                  # (cairn: CAIRN_NATS_TLS_CERT and CAIRN_NATS_TLS_KEY)
#   timeout: 2
# }
"""


def _string(value: str | Path) -> str:
    # JSON strings are valid nats-server config strings (and no `$` variable is expanded).
    return json.dumps(str(value))


def _allow(kind: str, subjects: Iterable[str]) -> list[str]:
    items = ",\n".join(f"            {_string(s)}" for s in subjects)
    return [f"        {kind}: {{", "          allow: [", items, "          ]", "        }"]


def server_config(users: Mapping[str, Credentials], options: ServerOptions | None = None) -> str:
    """A nats-server configuration: JetStream, the given options, and one user per role."""
    opts = options or ServerOptions()
    lines = [
        "# nats-server configuration for cairn, written by `cairn nats-config`.",
        "# It holds every role's password: keep it private. Start: nats-server -c THIS_FILE",
    ]
    if opts.listen is not None:
        lines.append(f"listen: {_string(opts.listen)}")
    if opts.monitor is not None:
        lines.append(f"http: {_string(opts.monitor)}  # monitoring, /healthz")
    lines.append(f"max_payload: {1024 * 1024}")
    if opts.store_dir is not None:
        lines.append(f"jetstream {{ store_dir: {_string(opts.store_dir)} }}")
    else:
        lines.append("jetstream: enabled")
    lines.append("")
    if opts.tls_cert is not None and opts.tls_key is not None:
        lines.append("tls {")
        lines.append(f"  cert_file: {_string(opts.tls_cert)}")
        lines.append(f"  key_file: {_string(opts.tls_key)}")
        if opts.tls_ca is not None:
            lines.append(f"  ca_file: {_string(opts.tls_ca)}")
            lines.append("  verify: true")
        lines.append("  timeout: 2")
        lines.append("}")
    else:
        lines.append(_TLS_EXAMPLE.rstrip("\n"))
    lines.append("")
    lines.append("# One user per role; anything not allowed is denied.")
    lines.append("authorization {")
    lines.append("  users = [")
    for role, creds in users.items():
        perms = role_permissions(role)
        lines.append(f"    # {role}")
        lines.append("    {")
        lines.append(f"      user: {_string(creds.user)}")
        lines.append(f"      password: {_string(creds.password)}")
        lines.append("      permissions: {")
        lines.extend(_allow("publish", perms.publish))
        lines.extend(_allow("subscribe", perms.subscribe))
        if perms.allow_responses:
            lines.append("        allow_responses: true")
        lines.append("      }")
        lines.append("    }")
    lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Deployment:
    """A written configuration and the credentials file of each of its roles."""

    directory: Path
    config: Path
    credentials: dict[str, Path]
    created: tuple[str, ...]  # roles whose credentials were new (the others were kept)


def write_deployment(
    directory: Path, capabilities: Iterable[str], options: ServerOptions | None = None
) -> Deployment:
    """Write `nats-server.conf` and `<role>.env` for the base roles and each capability.

    A role whose credentials file exists keeps its password, so running this again (to add
    a capability, say) does not lock out the processes already deployed.
    """
    roles = roles_for(capabilities)
    directory.mkdir(parents=True, exist_ok=True)
    users: dict[str, Credentials] = {}
    created: list[str] = []
    for role in roles:
        path = credentials_path(directory, role)
        if path.exists():
            users[role] = Credentials.read(path)
            continue
        users[role] = Credentials.generate(role)
        users[role].write(path, role)
        created.append(role)
    config = directory / CONFIG_NAME
    _write_private(config, server_config(users, options))
    return Deployment(
        directory, config, {r: credentials_path(directory, r) for r in roles}, tuple(created)
    )


def deployed_capabilities(directory: Path) -> list[str]:
    """The capabilities that have credentials in a directory written by `write_deployment`."""
    found = (
        p.name.removesuffix(CREDENTIALS_SUFFIX).removeprefix(AGENT_ROLE_PREFIX)
        for p in sorted(directory.glob(f"{AGENT_ROLE_PREFIX}*{CREDENTIALS_SUFFIX}"))
    )
    return [c for c in found if _CAPABILITY.match(c)]


def embedded_deployment(home: Path, capabilities: Iterable[str]) -> Deployment:
    """The embedded server's users under `<home>/nats-auth`: made once, then kept (with any
    capability added there since, e.g. by `cairn nats-config --out <home>/nats-auth`)."""
    directory = home / EMBEDDED_AUTH_DIR
    known = deployed_capabilities(directory) if directory.is_dir() else []
    return write_deployment(directory, [*capabilities, *known])
