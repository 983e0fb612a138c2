"""A live view of a run's progress, fed by committed-event notices.

Each step's status is the coordinator's (`cairn.events.lifecycle`: the same table applied to
the same events); `_LOOKS` is how the table shows each status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from rich.table import Table
from rich.text import Text

from cairn.cli.plain import plain
from cairn.events import RUN_ENDED, EventNotice, RunStatus, StepStatus, effect_named

# How each step status is shown: its words, mark and style.
_LOOKS: dict[StepStatus, tuple[str, str, str]] = {
    "pending": ("pending", "·", "dim"),
    "awaiting_approval": ("awaiting approval", "⏸", "bold yellow"),
    "blocked": ("blocked", "⏸", "bold red"),
    "dispatched": ("dispatched", "▶", "yellow"),
    "retry_wait": ("retrying", "↻", "magenta"),
    "completed": ("completed", "✓", "green"),
    "skipped": ("skipped", "↷", "dim"),
    "failed": ("failed", "✗", "red"),
}
# A step dispatched again shows as retrying while that attempt is out, too.
_REDISPATCHED = _LOOKS["retry_wait"]


@dataclass
class StepLine:
    """One step's line of the progress table."""

    name: str
    capability: str
    status: StepStatus = "pending"
    attempt: int = 0
    agent: str = ""
    tokens: int = 0
    cost: Decimal = Decimal(0)
    started: datetime | None = None
    seconds: float | None = None

    def looks(self) -> tuple[str, str, str]:
        """The status's words, mark and style."""
        if self.status == "dispatched" and self.attempt > 1:
            return _REDISPATCHED
        return _LOOKS[self.status]


@dataclass
class RunProgress:
    """Folds live notices into what the progress table shows."""

    run_id: str
    steps: dict[str, StepLine] = field(default_factory=dict)
    status: RunStatus | Literal["starting"] = "starting"
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
        effect = effect_named(kind)
        if effect.run is not None:
            self.status = effect.run
        if kind == "RunStarted":
            wf = e["workflow"]
            self.workflow = f"{wf['name']} v{wf['version']}"
            for step in wf["steps"]:
                self.steps[step["name"]] = StepLine(step["name"], step["capability"])
            return
        if kind == "StepAdmitted":
            spec = e["spec"]
            self.steps[spec["name"]] = StepLine(spec["name"], spec["capability"])
            return
        if kind == "RunCompleted":
            self.output = e["output"]
        elif kind == "RunFailed":
            self.error = e["error"]
        row = self.steps.get(e.get("step") or "")
        if row is None:
            return
        if effect.step is not None:
            row.status = effect.step
        if kind == "TaskDispatched":
            row.attempt = e["attempt"]
            row.started = datetime.fromisoformat(e["at"])
        elif kind == "TaskCompleted":
            row.agent = e["agent_id"]
            if row.started is not None:
                row.seconds = (datetime.fromisoformat(e["at"]) - row.started).total_seconds()
        elif kind == "CostCharged":
            row.tokens += e["input_tokens"] + e["output_tokens"]
            amount = Decimal(str(e["amount_usd"]))
            row.cost += amount
            self.cost += amount
        elif kind in ("TaskFailed", "ContractViolated"):
            row.agent = e["agent_id"]
        elif kind == "ApprovalGranted":
            row.agent = f"approved by {e['by']}"

    @property
    def done(self) -> bool:
        return self.status in RUN_ENDED

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
            words, mark, style = row.looks()
            table.add_row(
                plain(row.name),
                plain(row.agent or row.capability),
                Text(f"{mark} {words}", style=style),
                str(row.attempt or ""),
                f"{row.tokens:,}" if row.tokens else "",
                f"{row.cost:.6f}" if row.cost else "",
                f"{row.seconds * 1000:.0f} ms" if row.seconds is not None else "",
            )
        table.caption = f"{self.events} events committed · total {self.cost:.6f} USD"
        return table
