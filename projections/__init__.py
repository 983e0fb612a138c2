"""cairn's projections: fold the event log into views of runs, steps, costs and the audit trail.

`ProjectionRunner` keeps the views up to date (exactly once, from a tracked position),
`rebuild` recreates them from the whole log, and `Views` is the read API.
"""

from .errors import (
    AmbiguousRunError,
    ProjectionConflictError,
    RunNotFoundError,
    ViewsMissingError,
    ViewsUnavailableError,
)
from .projection import RunStatus, StepStatus
from .queries import CostKey, Views, wait_for_views
from .rows import AuditRow, CostRow, RunRow, StepRow
from .runner import DEFAULT_BATCH_SIZE, PROJECTION_NAME, ProjectionRunner, rebuild

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "PROJECTION_NAME",
    "AmbiguousRunError",
    "AuditRow",
    "CostKey",
    "CostRow",
    "ProjectionConflictError",
    "ProjectionRunner",
    "RunNotFoundError",
    "RunRow",
    "RunStatus",
    "StepRow",
    "StepStatus",
    "Views",
    "ViewsMissingError",
    "ViewsUnavailableError",
    "rebuild",
    "wait_for_views",
]
