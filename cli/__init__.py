"""The `cairn` command: a root app (`app.py`) and one module per command group, each
registering its commands on the root. Nothing in cairn imports this package."""

from cairn.cli import (  # noqa: F401  (each module registers its commands on `app`)
    audit,
    bench,
    history,
    natsconfig,
    protocol,
    runs,
    serve,
    services,
    views,
)
from cairn.cli.app import app


def main() -> None:
    """The `cairn` console script."""
    app()


__all__ = ["app", "main"]
