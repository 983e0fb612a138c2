"""`python -m cairn.projections.http`: the HTTP API and dashboard as a process of its own.

Settings come from the environment (CAIRN_HOME, CAIRN_VIEWS, CAIRN_STORE, NATS_URL, see
`Settings`), the address from `--host`/`--port` or CAIRN_HTTP_HOST/CAIRN_HTTP_PORT, the body
limit from `--max-body` or CAIRN_HTTP_MAX_BODY, the tokens from `--tokens` or as
`auth.load_tokens` says. Exits 2 with one sentence when it cannot start.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from cairn.projections.http.auth import TokenConfigError, load_tokens
from cairn.projections.http.server import DEFAULT_PORT, ServeError, serve
from cairn.runtime.settings import Settings, SettingsError

log = logging.getLogger("cairn.http")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cairn.projections.http", description="cairn's HTTP API and dashboard."
    )
    parser.add_argument("--host", default=None, help="default CAIRN_HTTP_HOST or 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default CAIRN_HTTP_PORT or 8700")
    parser.add_argument("--tokens", type=Path, default=None, help="token file (YAML or JSON)")
    parser.add_argument(
        "--max-body",
        type=int,
        default=None,
        help="largest request body taken, in bytes (413 beyond it)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    try:
        settings = Settings.from_env()
        tokens = load_tokens(settings, args.tokens)
        host = args.host if args.host is not None else settings.http_host
        port = args.port if args.port is not None else settings.http_port
        if args.max_body is not None:
            settings = replace(settings, http_max_body=args.max_body)
        serve(settings, tokens, host, DEFAULT_PORT if port is None else port)
    except (SettingsError, TokenConfigError, ServeError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
