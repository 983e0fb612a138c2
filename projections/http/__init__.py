"""cairn's HTTP API and dashboard: `create_app(settings, tokens)`, served by `cairn serve`.

JSON endpoints over the views and the coordinator's commands (OpenAPI at `/openapi.json`,
`/docs`), server-sent events from the live event feed, and server-rendered pages. Every
request needs a bearer token (or the dashboard's login cookie) with a role: see `auth`.
"""

from cairn.projections.http.app import create_app
from cairn.projections.http.auth import (
    TOKENS_ENV,
    TOKENS_FILE_ENV,
    Grant,
    Role,
    TokenConfigError,
    Tokens,
    dev_token_file,
    load_tokens,
    tokens_configured,
)
from cairn.projections.http.server import DEFAULT_HOST, DEFAULT_PORT, ServeError, serve, url_file

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "TOKENS_ENV",
    "TOKENS_FILE_ENV",
    "Grant",
    "Role",
    "ServeError",
    "TokenConfigError",
    "Tokens",
    "create_app",
    "dev_token_file",
    "load_tokens",
    "serve",
    "tokens_configured",
    "url_file",
]
