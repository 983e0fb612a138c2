"""Who may call the HTTP API: bearer tokens with a subject and a role, from configuration.

A token maps to a `Grant`: the subject (recorded as who decided, e.g. `human:maria` in an
ApprovalGranted event) and a role. Roles are ordered: a `viewer` reads, an `approver` also
approves and denies gates, an `admin` also cancels runs and raises budgets.

Where the tokens come from, the first that is given:
1. `--tokens FILE` of `cairn serve`;
2. `CAIRN_API_TOKENS` (`Settings.api_tokens`): the mapping itself, as JSON or YAML text;
3. `CAIRN_API_TOKENS_FILE` (`Settings.api_tokens_file`): a file path;
4. `<home>/api-tokens.yaml`, created with one admin token on first use (`dev_token_file`).

A file or the variable holds `token: {subject: NAME, role: viewer|approver|admin}` entries.
Tokens are kept only as SHA-256 digests in memory, so lookups do not compare secrets byte by
byte. A token file is read again when it changes: no restart.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping
from enum import IntEnum
from pathlib import Path
from typing import Any

import yaml
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cairn.events import error_location
from cairn.projections.http.errors import ApiError, LoginRequired, unauthorized
from cairn.runtime.settings import Settings, SettingsError

log = logging.getLogger("cairn.http")

TOKENS_ENV = "CAIRN_API_TOKENS"
TOKENS_FILE_ENV = "CAIRN_API_TOKENS_FILE"
DEV_TOKENS_NAME = "api-tokens.yaml"
COOKIE_NAME = "cairn_token"
MIN_TOKEN_LENGTH = 16


class Role(IntEnum):
    """What a token may do; each role may do everything the ones below it may."""

    viewer = 1
    approver = 2
    admin = 3


class TokenConfigError(ValueError):
    """The token configuration cannot be used; the message names the source and the fix."""


class Grant(BaseModel):
    """What one token stands for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subject: str = Field(min_length=1, max_length=200, pattern=r"^\S(.*\S)?$")
    role: Role

    def may(self, role: Role) -> bool:
        return self.role >= role


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Tokens:
    """The configured tokens, by digest; `source` says where they came from.

    Tokens read from a file are read again when the file changes (its size, modification time
    or inode), at the next lookup: a token added or removed counts without a restart. A file
    changed into one that cannot be used grants nothing until it is mended (the error is logged
    and named in `source`): a broken edit must not keep a removed token alive."""

    def __init__(self, grants: Mapping[str, Grant], source: str, path: Path | None = None) -> None:
        self.grants = grants
        self._source = source
        self._path = path
        self._stamp = _stamp(path) if path is not None else None
        self._problem: str | None = None

    @property
    def source(self) -> str:
        if self._problem is not None:
            return f"{self._source} (which cannot be used now: {self._problem})"
        return self._source

    def lookup(self, token: str) -> Grant | None:
        self._reload_if_changed()
        return self.grants.get(_digest(token))

    def _reload_if_changed(self) -> None:
        if self._path is None:
            return
        stamp = _stamp(self._path)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            fresh = _from_file(self._path)
        except TokenConfigError as exc:
            self.grants, self._problem = {}, str(exc)
            log.error("the API's tokens are not usable until the file is mended: %s", exc)
            return
        self.grants, self._problem = fresh.grants, None
        log.info("read the API's tokens again from %s (%d)", self._path, len(fresh.grants))

    @classmethod
    def from_mapping(cls, data: Any, source: str, path: Path | None = None) -> Tokens:
        """Validate `{token: {subject, role}}`; raise TokenConfigError naming `source`. With
        `path`, the tokens are read from there again whenever that file changes."""
        if not isinstance(data, Mapping) or not data:
            raise TokenConfigError(
                f"{source} must map each token to {{subject: NAME, role: viewer|approver|admin}}"
            )
        grants: dict[str, Grant] = {}
        for token, entry in data.items():
            if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
                raise TokenConfigError(
                    f"{source}: every token must be a string of at least {MIN_TOKEN_LENGTH} "
                    "characters (make one with `python -c 'import secrets; "
                    "print(secrets.token_urlsafe(24))'`)"
                )
            if isinstance(entry, Mapping) and isinstance(entry.get("role"), str):
                role = entry["role"]
                if role not in Role.__members__:
                    raise TokenConfigError(
                        f"{source}: role {role!r} of {entry.get('subject')!r} is not one of "
                        "viewer, approver, admin"
                    )
                entry = {**entry, "role": Role[role]}
            try:
                grants[_digest(token)] = Grant.model_validate(entry)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = error_location(first["loc"], "entry")
                raise TokenConfigError(
                    f"{source}: a token's {where} is invalid ({first['msg']}); each token "
                    "needs {subject: NAME, role: viewer|approver|admin}"
                ) from None
        return cls(grants, source, path)


def load_tokens(settings: Settings | Path, file: Path | None = None) -> Tokens:
    """The tokens from the first configured source (see the module's docstring).

    `settings` may be only a home directory: then the variables are read by
    `Settings.from_env(home)`."""
    if file is not None:
        return _from_file(file.absolute())  # read again later, whatever the directory then
    if not isinstance(settings, Settings):
        try:
            settings = Settings.from_env(settings)
        except SettingsError as exc:
            raise TokenConfigError(str(exc)) from None
    if settings.api_tokens:
        try:
            data = yaml.safe_load(settings.api_tokens)
        except yaml.YAMLError as exc:
            raise TokenConfigError(f"{TOKENS_ENV} is not valid JSON or YAML: {exc}") from None
        return Tokens.from_mapping(data, TOKENS_ENV)
    if settings.api_tokens_file:
        return _from_file(settings.api_tokens_file)
    created, _ = dev_token_file(settings.home)
    return _from_file(created)


def tokens_configured(settings: Settings) -> bool:
    """Whether `CAIRN_API_TOKENS` or `CAIRN_API_TOKENS_FILE` name the tokens."""
    return bool(settings.api_tokens or settings.api_tokens_file)


def _from_file(path: Path) -> Tokens:
    try:
        text = path.read_text()
    except OSError as exc:
        raise TokenConfigError(
            f"cannot read the token file {path} ({exc.strerror}): "
            f"pass an existing file with --tokens or set {TOKENS_ENV}"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TokenConfigError(f"the token file {path} is not valid YAML or JSON: {exc}") from None
    return Tokens.from_mapping(data, f"the token file {path}", path)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is written or replaced; None while it is missing."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


def dev_token_file(home: Path) -> tuple[Path, str | None]:
    """`<home>/api-tokens.yaml`, created with one admin token if missing.

    Returns the path and, only when this call created the file, the new admin token (so the
    caller can show it once).
    """
    path = home / DEV_TOKENS_NAME
    if path.exists():
        return path, None
    home.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    subject = os.environ.get("USER") or "local-admin"
    text = (
        "# cairn HTTP API tokens: token -> who (recorded as the one who decided) and role.\n"
        "# Roles: viewer (read), approver (also approve/deny), admin (also cancel, budgets).\n"
        "# Created for local use by cairn; add lines like the one below for other people.\n"
        + yaml.safe_dump({token: {"subject": subject, "role": "admin"}}, sort_keys=False)
    )
    # Created owner-only from the start: the file holds secrets.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process of the same `cairn up` made it first
        return path, None
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return path, token


# -- per request -------------------------------------------------------------------------------

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _presented(request: Request) -> tuple[str | None, bool]:
    """The token the request carries and whether it came in the login cookie."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise unauthorized("the Authorization header must be `Bearer TOKEN`")
        return value.strip(), False
    cookie = request.cookies.get(COOKIE_NAME)
    return (cookie, True) if cookie else (None, False)


def grant_of(request: Request) -> Grant | None:
    """The grant of the request's token, None without one; 401 for a token not configured."""
    token, from_cookie = _presented(request)
    if token is None:
        return None
    tokens: Tokens = request.app.state.tokens
    grant = tokens.lookup(token)
    if grant is None:
        raise unauthorized(
            "this token is not configured on the server: use one from "
            f"{tokens.source} (or log in again at /login)"
        )
    if from_cookie and request.method not in _SAFE_METHODS:
        # The cookie is SameSite=Strict; requiring JSON as well means a form on another site
        # cannot send a command with it (a cross-site JSON request needs CORS, never granted).
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(
                403, "a command sent with the login cookie must have Content-Type application/json"
            )
    return grant


def require(role: Role) -> Callable[[Request], Awaitable[Grant]]:
    """A FastAPI dependency: the caller's grant, if its role is `role` or higher (else 401/403)."""

    async def dependency(request: Request) -> Grant:
        grant = grant_of(request)
        if grant is None:
            raise unauthorized(
                "no token: send `Authorization: Bearer TOKEN`, or log in at /login for the "
                "dashboard"
            )
        if not grant.may(role):
            raise ApiError(
                403,
                f"{grant.subject} has the {grant.role.name} role: this needs {role.name} or higher",
            )
        return grant

    return dependency


async def page_viewer(request: Request) -> Grant:
    """A dashboard page's dependency: any valid login, or off to /login and back."""
    try:
        grant = grant_of(request)
    except ApiError:
        grant = None
    if grant is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)
    return grant
