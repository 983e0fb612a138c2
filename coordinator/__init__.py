"""The coordinator: run state and pure decisions, the event store, the NATS service with its
outbox relay, workflow loading, and the `cairn` command line."""

from .client import CairnClient, CoordinatorUnavailableError, EventFeed
from .decisions import CancelFact, Policy, Rejected, ResultFact, StartRunFact, decide
from .embedded import EmbeddedNats, EmbeddedServerError
from .engine import Coordinator
from .nats_auth import NatsEndpoint
from .nats_client import NatsAuthError, NatsUnavailableError, connect, declare_streams
from .pricing import PriceTable, load_price_table
from .service import create_app
from .settings import Settings
from .state import RunState, StepState, evolve, fold
from .store import ConcurrencyError, EventStore, LoggedEvent, StoreUnavailableError
from .workflow import WorkflowCatalog, WorkflowError, load_workflow_file, parse_workflow

__all__ = [
    "CairnClient",
    "CancelFact",
    "ConcurrencyError",
    "Coordinator",
    "CoordinatorUnavailableError",
    "EmbeddedNats",
    "EmbeddedServerError",
    "EventFeed",
    "EventStore",
    "LoggedEvent",
    "NatsAuthError",
    "NatsEndpoint",
    "NatsUnavailableError",
    "Policy",
    "PriceTable",
    "Rejected",
    "ResultFact",
    "RunState",
    "Settings",
    "StartRunFact",
    "StepState",
    "StoreUnavailableError",
    "WorkflowCatalog",
    "WorkflowError",
    "connect",
    "create_app",
    "decide",
    "declare_streams",
    "evolve",
    "fold",
    "load_price_table",
    "load_workflow_file",
    "parse_workflow",
]
