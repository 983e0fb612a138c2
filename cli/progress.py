"""A live view of a run's progress, fed by committed-event notices."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from rich.table import Table
from rich.text import Text

from cairn.events import EventNotice

_STATUS_STYLE = {
    "pending": ("·", "dim"),
    "awaiting approval": ("⏸", "bold yellow"),
    "blocked": ("⏸", "bold red"),
    "dispatched": ("▶", "yellow"),
    "retrying": ("↻", "magenta"),
    "completed": ("✓", "green"),
    "failed": ("✗", "red"),
}


@dataclass
class StepRow:
    name: str
    capability: str
    status: str = "pending"
    attempt: int = 0
    agent: str = ""
    tokens: int = 0
    cost: Decimal = Decimal(0)
    started: datetime | None = None
    seconds: float | None = None


@dataclass
class RunProgress:
    """Folds live notices into what the progress table shows."""

    run_id: str
    steps: dict[str, StepRow] = field(default_factory=dict)
    status: str = "starting"
    workflow: str = ""
    events: int = 0
    position: int = 0
    cost: Decimal = Decimal(0)
    output: Any = None
    error: str | None = None

    def apply(self, notice: EventNotice) -> None:
        e = notice.event
        self.events += 1
        self.position = max(self.position, notice.position)
        kind = notice.type
        if kind == "RunStarted":
            self.status = "running"
            wf = e["workflow"]
            self.workflow = f"{wf['name']} v{wf['version']}"
            for step in wf["steps"]:
                self.steps[step["name"]] = StepRow(step["name"], step["capability"])
        elif kind == "TaskDispatched" and e["step"] in self.steps:
            row = self.steps[e["step"]]
            row.status = "dispatched" if e["attempt"] == 1 else "retrying"
            row.attempt = e["attempt"]
            row.started = datetime.fromisoformat(e["at"])
        elif kind == "TaskCompleted" and e["step"] in self.steps:
            row = self.steps[e["step"]]
            row.status = "completed"
            row.agent = e["agent_id"]
            if row.started is not None:
                row.seconds = (datetime.fromisoformat(e["at"]) - row.started).total_seconds()
        elif kind == "CostCharged" and e["step"] in self.steps:
            row = self.steps[e["step"]]
            row.tokens += e["input_tokens"] + e["output_tokens"]
            amount = Decimal(str(e["amount_usd"]))
            row.cost += amount
            self.cost += amount
        elif kind in ("TaskFailed", "ContractViolated") and e["step"] in self.steps:
            self.steps[e["step"]].agent = e["agent_id"]
        elif kind == "ApprovalRequested" and e["step"] in self.steps:
            self.steps[e["step"]].status = "awaiting approval"
        elif kind == "ApprovalGranted" and e["step"] in self.steps:
            self.steps[e["step"]].agent = f"approved by {e['by']}"
        elif kind == "BudgetExhausted" and e["step"] in self.steps:
            self.steps[e["step"]].status = "blocked"
        elif kind == "StepAdmitted":
            spec = e["spec"]
            self.steps[spec["name"]] = StepRow(spec["name"], spec["capability"])
        elif kind == "RunCompleted":
            self.status = "completed"
            self.output = e["output"]
        elif kind == "RunFailed":
            self.status = "failed"
            self.error = e["error"]
            if e.get("step") in self.steps:
                self.steps[e["step"]].status = "failed"
        elif kind == "RunCancelled":
            self.status = "cancelled"

    @property
    def done(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    def table(self) -> Table:
        title = f"run {self.run_id[:8]} · {self.workflow or '…'} · {self.status}"
        table = Table(title=title, title_justify="left", expand=False)
        table.add_column("step")
        table.add_column("agent")
        table.add_column("status")
        table.add_column("try", justify="right")
        table.add_column("tokens", justify="right")
        table.add_column("cost (USD)", justify="right")
        table.add_column("time", justify="right")
        for row in self.steps.values():
            mark, style = _STATUS_STYLE.get(row.status, ("?", ""))
            table.add_row(
                row.name,
                row.agent or row.capability,
                Text(f"{mark} {row.status}", style=style),
                str(row.attempt or ""),
                f"{row.tokens:,}" if row.tokens else "",
                f"{row.cost:.6f}" if row.cost else "",
                f"{row.seconds * 1000:.0f} ms" if row.seconds is not None else "",
            )
        table.caption = f"{self.events} events committed · total {self.cost:.6f} USD"
        return table
