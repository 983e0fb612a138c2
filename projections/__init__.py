"""cairn's projections: fold the event log into views of runs, steps, costs and the audit trail.

`ProjectionRunner` keeps the views up to date (exactly once, from a tracked position),
`rebuild` recreates them from the whole log, `projection_status` says how far behind they are,
and `Views` is the read API. `step_provenance` answers "why is this step's output what it is"
from a run's events.
"""

from cairn.events import RunStatus
from cairn.projections.errors import (
    AmbiguousRunError,
    ProjectionConflictError,
    RunNotFoundError,
    ViewsMissingError,
    ViewsUnavailableError,
)
from cairn.projections.projection import StepRowStatus
from cairn.projections.provenance import (
    AttemptRow,
    ChargeRow,
    LineageRow,
    Producer,
    Provenance,
    ResultRow,
    StepEventRow,
    StepNotFoundError,
    step_provenance,
)
from cairn.projections.queries import CostKey, Views, wait_for_views
from cairn.projections.rows import AuditRow, CostRow, ProjectionStatus, RunRow, StepRow
from cairn.projections.runner import (
    DEFAULT_BATCH_SIZE,
    PROJECTION_NAME,
    VIEW_NAMES,
    ProjectionRunner,
    rebuild,
)
from cairn.projections.status import projection_status

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "PROJECTION_NAME",
    "VIEW_NAMES",
    "AmbiguousRunError",
    "AttemptRow",
    "AuditRow",
    "ChargeRow",
    "CostKey",
    "CostRow",
    "LineageRow",
    "Producer",
    "ProjectionConflictError",
    "ProjectionRunner",
    "ProjectionStatus",
    "Provenance",
    "ResultRow",
    "RunNotFoundError",
    "RunRow",
    "RunStatus",
    "StepEventRow",
    "StepNotFoundError",
    "StepRow",
    "StepRowStatus",
    "Views",
    "ViewsMissingError",
    "ViewsUnavailableError",
    "projection_status",
    "rebuild",
    "step_provenance",
    "wait_for_views",
]
