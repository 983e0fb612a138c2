"""cairn installs under one `cairn.` namespace and lives beside the OpenAI Agents SDK."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("events", "runtime", "coordinator", "agents", "projections", "cli", "benchmarks")


def test_openai_agents_and_cairn_agents_import_side_by_side(tmp_path: Path) -> None:
    # Run from an empty folder so the repository's own `agents/` folder is not on sys.path.
    code = (
        "import agents, cairn.agents, cairn.events, cairn.coordinator, cairn.projections\n"
        "from agents import Agent as OpenAIAgent, Runner\n"
        "from cairn.agents import Agent as CairnAgent\n"
        "assert 'site-packages' in agents.__file__, agents.__file__\n"
        "assert OpenAIAgent is not CairnAgent\n"
        "assert OpenAIAgent.__module__.startswith('agents')\n"
        "assert CairnAgent.__module__ == 'cairn.agents.base'\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.timeout(180)
def test_wheel_maps_the_four_folders_under_cairn(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("cairn-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.startswith("cairn-")}
    assert top == {"cairn"}, top
    for package in PACKAGES:
        assert f"cairn/{package}/__init__.py" in names
    assert "cairn/coordinator/workflows/research-report.yaml" in names
    assert "cairn/coordinator/prices.yaml" in names
    assert "cairn/agents/examples/planner.py" in names
    # The dashboard's templates and assets ship with it (no front-end build, no CDN).
    for asset in ("__main__.py", "templates/run.html", "static/dashboard.js", "static/style.css"):
        assert f"cairn/projections/http/{asset}" in names


def test_the_agent_sdk_loads_no_coordinator_and_no_event_log(tmp_path: Path) -> None:
    # An agent author needs the SDK, the contract and what every process shares: nothing of
    # the coordinator, and not the event store's library.
    code = (
        "import sys\n"
        "import cairn.agents\n"
        "from cairn.agents.examples import planner\n"
        "heavy = ('cairn.coordinator', 'cairn.projections', 'cairn.runtime.eventlog.store',\n"
        "         'eventsourcing')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def package_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_module_says_what_it_holds() -> None:
    import ast

    silent = [
        str(p.relative_to(ROOT))
        for p in package_modules()
        if not ast.get_docstring(ast.parse(p.read_text()))
    ]
    assert silent == []


def test_no_module_is_over_600_lines() -> None:
    # A module longer than that holds more than one job: split it by job.
    long = {
        str(p.relative_to(ROOT)): n
        for p in package_modules()
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert long == {}
