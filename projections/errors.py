"""What can go wrong when projecting into or reading from the views, each with what to do."""

from __future__ import annotations


class ViewsUnavailableError(RuntimeError):
    """The views database cannot be opened or read; the message says which and what to do."""


class ViewsMissingError(ViewsUnavailableError):
    """The views have not been built yet (no database file, or no view tables in it)."""

    def __init__(self, location: str) -> None:
        self.location = location
        super().__init__(
            f"no views yet at {location}: run `cairn up` or `cairn projections rebuild`"
        )


class RunNotFoundError(LookupError):
    """No single projected run matches the given run id or prefix."""


class AmbiguousRunError(RunNotFoundError):
    """A run id prefix matches more than one run."""


class ProjectionConflictError(RuntimeError):
    """Another runner moved the tracked position first; the batch was rolled back.

    The runner that sees this re-reads the position and carries on from there, so nothing is
    projected twice even when two runners follow the same log into the same views.
    """
