"""The `cairn` command: a root app (`app.py`) and one module per command group, each
registering its commands on the root. Nothing in cairn imports this package."""

# Each module registers its commands on `app`, in the order `cairn --help` lists them: the
# commands on a run's record (history ... diff) stay together.
# isort: off
from cairn.cli import (  # noqa: F401
    audit,
    bench,
    history,
    portable,
    replay,
    verify,
    diff,
    natsconfig,
    protocol,
    runs,
    deadletters,
    serve,
    services,
    views,
)

# isort: on
from cairn.cli.app import app


def main() -> None:
    """The `cairn` console script."""
    app()


__all__ = ["app", "main"]
