"""The table `cairn bench` prints and keeps: rows with their targets, the machine they were
measured on, and the JSON and Markdown files results are compared by across commits."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

from cairn.runtime.embedded import nats_server_binary


@dataclass
class Row:
    """One line of the table. `value` is None when the figure could not be measured, and then
    `note` says why; `met` says whether the value reaches `target` (None without a target)."""

    section: str
    measure: str
    value: float | None
    unit: str
    target: str = ""
    met: bool | None = None
    note: str = ""


def row(
    section: str,
    measure: str,
    value: float | None,
    unit: str,
    *,
    at_most: float | None = None,
    at_least: float | None = None,
    note: str = "",
) -> Row:
    """A row, with its target (`at_most` or `at_least`) and whether the value meets it."""
    target = ""
    met = None
    if at_most is not None:
        target = f"≤ {number(at_most)} {unit}"
        met = value is not None and value <= at_most
    elif at_least is not None:
        target = f"≥ {number(at_least)} {unit}"
        met = value is not None and value >= at_least
    if value is None:
        met = None
    return Row(section, measure, value, unit, target, met, note)


def not_measured(
    section: str,
    measure: str,
    unit: str,
    why: str,
    *,
    at_most: float | None = None,
    at_least: float | None = None,
) -> Row:
    """A row without a value; `why` becomes its note."""
    return row(section, measure, None, unit, at_most=at_most, at_least=at_least, note=f"n/a: {why}")


@dataclass
class Report:
    """The whole table with where and when it was measured."""

    started_at: str
    seconds: float
    scale: str
    commit: str | None
    machine: dict[str, Any]
    rows: list[Row]
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "started_at": self.started_at,
            "seconds": round(self.seconds, 1),
            "scale": self.scale,
            "commit": self.commit,
            "machine": self.machine,
            "rows": [asdict(r) for r in self.rows],
            "details": self.details,
        }

    def to_markdown(self) -> str:
        m = self.machine
        lines = [
            f"# cairn bench, {self.started_at}",
            "",
            f"- commit {self.commit or 'unknown'}, scale {self.scale}, "
            f"wall time {self.seconds:.0f} s",
            f"- {m.get('nproc')} × {m.get('cpu')}, {m.get('ram_gib')} GiB RAM, {m.get('os')}, "
            f"Python {m.get('python')}",
            f"- load average at start / end: {m.get('load_start')} / {m.get('load_end')}",
            "",
            "| section | measure | value | target | note |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.section} | {r.measure} | {format_value(r)} | {format_target(r)} | "
                f"{r.note.replace('|', '/')} |"
            )
        return "\n".join(lines) + "\n"


def format_value(r: Row) -> str:
    if r.value is None:
        return "n/a"
    if r.unit == "×":
        return f"{r.value:.2f}×"
    return f"{number(r.value)} {r.unit}"


def format_target(r: Row) -> str:
    if not r.target:
        return ""
    return r.target + {True: " ✓", False: " ✗", None: ""}[r.met]


def number(value: float) -> str:
    """Three significant digits, thousands separated."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if value else "0"


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (`q` from 0 to 100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, OS, Python, the versions that matter, and the load now."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram_gib: float | None = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    versions = {}
    for dist in ("nats-py", "faststream", "eventsourcing", "pydantic"):
        try:
            versions[dist] = dist_version(dist)
        except PackageNotFoundError:
            versions[dist] = "?"
    with contextlib.suppress(Exception):
        out = subprocess.run(
            [nats_server_binary(), "--version"], capture_output=True, text=True, timeout=5
        )
        versions["nats-server"] = out.stdout.strip().removeprefix("nats-server: ")
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": ram_gib,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions,
        "load_start": load_average(),
    }


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: a busy machine makes every figure worse."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def source_commit() -> str | None:
    """The git commit of the running source (`+dirty` with uncommitted changes), if any."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


def write_report(report: Report, out_dir: Path) -> tuple[Path, Path]:
    """Write `<timestamp>.json` and `<timestamp>.md` into `out_dir`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = report.started_at.removesuffix(" UTC").replace("-", "").replace(":", "")
    stamp = stamp.replace(" ", "-")
    json_path = out_dir / f"{stamp}.json"
    md_path = out_dir / f"{stamp}.md"
    json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    md_path.write_text(report.to_markdown())
    return json_path, md_path
