"""`python -m cairn.projections.http`: the HTTP API and dashboard as a process of its own.

Settings come from the environment (CAIRN_HOME, CAIRN_VIEWS, CAIRN_STORE, NATS_URL), the
address from `--host`/`--port` or CAIRN_HTTP_HOST/CAIRN_HTTP_PORT, the body limit from
`--max-body` or CAIRN_HTTP_MAX_BODY, the tokens from `--tokens` or as `auth.load_tokens` says.
Exits 2 with one sentence when it cannot start.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cairn.projections.http.auth import TokenConfigError, load_tokens
from cairn.projections.http.guard import DEFAULT_MAX_BODY
from cairn.projections.http.server import DEFAULT_HOST, DEFAULT_PORT, ServeError, serve
from cairn.runtime.settings import Settings

log = logging.getLogger("cairn.http")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cairn.projections.http", description="cairn's HTTP API and dashboard."
    )
    parser.add_argument("--host", default=os.environ.get("CAIRN_HTTP_HOST") or DEFAULT_HOST)
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("CAIRN_HTTP_PORT") or DEFAULT_PORT)
    )
    parser.add_argument("--tokens", type=Path, default=None, help="token file (YAML or JSON)")
    parser.add_argument(
        "--max-body",
        type=int,
        default=int(os.environ.get("CAIRN_HTTP_MAX_BODY") or DEFAULT_MAX_BODY),
        help="largest request body taken, in bytes (413 beyond it)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    settings = Settings.from_env()
    try:
        tokens = load_tokens(settings.home, args.tokens)
        serve(settings, tokens, args.host, args.port, max_body=args.max_body)
    except (TokenConfigError, ServeError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
