"""Settings: `Settings.from_env` is the one reader of `CAIRN_*` variables; every one it reads is
documented in its docstring and in the README's table, and `env()` hands them all to a child."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from cairn.runtime.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("events", "runtime", "coordinator", "agents", "projections", "cli", "benchmarks")
SETTINGS_MODULE = ROOT / "runtime" / "settings.py"
PER_PROCESS = {"health_file", "crash_at"}  # each process's own: not handed to children


def package_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def cairn_constants(files: list[Path]) -> dict[str, str]:
    """Module-level names bound to a `CAIRN_*` string (`TOKENS_ENV = "CAIRN_API_TOKENS"`)."""
    found: dict[str, str] = {}
    for path in files:
        for node in ast.parse(path.read_text()).body:
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
                and node.value.value.startswith("CAIRN_")
            ):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
                found.update(dict.fromkeys(names, node.value.value))
    return found


def environment_reads(source: str, constants: dict[str, str]) -> list[str]:
    """`line: VARIABLE` for each place `source` looks up a `CAIRN_*` variable in the process
    environment: `os.environ[...]`, `.get`, `getenv`, `in os.environ`, through a name
    bound to `os.environ` (`env = os.environ if environ is None else environ`), or by handing
    the environment and a variable's name to a helper together."""
    tree = ast.parse(source)

    def mentions_environ(node: ast.AST) -> bool:
        return any(
            (isinstance(n, ast.Attribute) and n.attr in ("environ", "getenv"))
            or (isinstance(n, ast.Name) and n.id in ("environ", "getenv"))
            for n in ast.walk(node)
        )

    aliases = {
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None
        if mentions_environ(node.value)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }

    def is_environ(node: ast.AST) -> bool:
        return mentions_environ(node) or (isinstance(node, ast.Name) and node.id in aliases)

    def variable(node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        elif isinstance(node, ast.Name | ast.Attribute):
            text = constants.get(node.id if isinstance(node, ast.Name) else node.attr, "")
        elif isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            text = first.value if isinstance(first, ast.Constant) else ""
        else:
            return None
        return text if isinstance(text, str) and text.startswith("CAIRN_") else None

    reads: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        names: list[str | None] = []
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            if is_environ(node.value):
                names = [variable(node.slice)]
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            reads_one = called == "getenv" or (
                called in ("get", "setdefault") and is_environ(getattr(func, "value", func))
            )
            if reads_one:
                names = [variable(a) for a in node.args[:1]]
            elif any(is_environ(a) for a in node.args):
                names = [variable(a) for a in node.args]
        elif (
            isinstance(node, ast.Compare)
            and any(isinstance(op, ast.In | ast.NotIn) for op in node.ops)
            and any(is_environ(c) for c in node.comparators)
        ):
            names = [variable(node.left)]
        reads.extend((node.lineno, name) for name in names if name)
    return [f"{line}: {name}" for line, name in sorted(reads)]


def test_only_settings_reads_cairn_variables_from_the_environment() -> None:
    files = package_files()
    assert SETTINGS_MODULE in files
    constants = cairn_constants(files)
    offenders = {
        str(path.relative_to(ROOT)): reads
        for path in files
        if path != SETTINGS_MODULE
        if (reads := environment_reads(path.read_text(), constants))
    }
    assert offenders == {}, (
        "read CAIRN_* variables in runtime/settings.py (a Settings field) and take them from "
        f"the Settings the module is given: {offenders}"
    )


def test_the_scan_finds_every_way_a_module_used_to_read_the_environment() -> None:
    constants = {"TOKENS_ENV": "CAIRN_API_TOKENS"}
    caught = """
import os
from os import environ, getenv

a = float(os.environ.get("CAIRN_RESULT_ACK_WAIT", "30"))
b = os.environ["CAIRN_PRICES"]
c = os.environ.get(TOKENS_ENV)
d = getenv("CAIRN_TENANTS")
e = "CAIRN_HTTP_PORT" in os.environ
f = environ.get(f"CAIRN_{name}")

def from_env(environ=None):
    env = os.environ if environ is None else environ
    kind = env.get("CAIRN_LLM")
    return _env_number(env, "CAIRN_AGENT_CONCURRENCY", 4, int)
"""
    assert [r.split(": ")[1] for r in environment_reads(caught, constants)] == [
        "CAIRN_RESULT_ACK_WAIT",
        "CAIRN_PRICES",
        "CAIRN_API_TOKENS",
        "CAIRN_TENANTS",
        "CAIRN_HTTP_PORT",
        "CAIRN_",
        "CAIRN_LLM",
        "CAIRN_AGENT_CONCURRENCY",
    ]
    allowed = """
import os

env = {**os.environ, **settings.env()}
env["CAIRN_HTTP_PORT"] = "0"
env.pop(USER_ENV, None)
user, password = values.get(USER_ENV), values.get("CAIRN_NATS_PASSWORD")
who = os.environ.get("USER") or "demo-user"
"""
    assert environment_reads(allowed, {"USER_ENV": "CAIRN_NATS_USER"}) == []


class Recording(dict[str, str]):
    """An environment that remembers which variables were asked for."""

    def __init__(self, values: dict[str, str] | None = None) -> None:
        super().__init__(values or {})
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)


def variables_read() -> set[str]:
    env = Recording()
    Settings.from_env(environ=env)
    return {name for name in env.asked if name.startswith("CAIRN_")}


def test_every_variable_is_documented_in_settings_and_in_the_readme() -> None:
    names = variables_read()
    assert len(names) > 30
    docstring = Settings.__doc__ or ""
    assert sorted(n for n in names if f"`{n}" not in docstring) == []
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration") :]
    table = table[: table.index("\n\n", table.index("| variable"))]
    assert sorted(n for n in names if f"`{n}`" not in table) == []


def test_env_hands_every_setting_to_a_child(tmp_path: Path) -> None:
    given = {
        "CAIRN_HOME": str(tmp_path / "home"),
        "NATS_URL": "nats://127.0.0.1:4999",
        "CAIRN_STORE": str(tmp_path / "events.db"),
        "CAIRN_VIEWS": str(tmp_path / "views.db"),
        "CAIRN_NATS_USER": "me",
        "CAIRN_NATS_PASSWORD": "secret",
        "CAIRN_NATS_CREDS": str(tmp_path / "me.env"),
        "CAIRN_NATS_TLS_CA": str(tmp_path / "ca.pem"),
        "CAIRN_NATS_TLS_CERT": str(tmp_path / "cert.pem"),
        "CAIRN_NATS_TLS_KEY": str(tmp_path / "key.pem"),
        "CAIRN_BLOB_THRESHOLD": "off",
        "CAIRN_START_TIMEOUT": "0",
        "CAIRN_RESTART_BACKOFF": "0.05",
        "CAIRN_RESTART_LIMIT": "3",
        "CAIRN_RESTART_WINDOW": "10",
        "CAIRN_PRICES": str(tmp_path / "prices.yaml"),
        "CAIRN_TENANTS": str(tmp_path / "tenants.yaml"),
        "CAIRN_CONTRACTS": "mine.contracts, theirs.contracts",
        "CAIRN_RESULT_ACK_WAIT": "2",
        "CAIRN_OUTBOX_SAVE_INTERVAL": "60",
        "CAIRN_FOLLOW_INTERVAL": "0.5",
        "CAIRN_TASK_RESEND_AFTER": "3",
        "CAIRN_AGENT_CONCURRENCY": "1",
        "CAIRN_AGENT_ACK_WAIT": "2.5",
        "CAIRN_AGENT_MAX_DELIVER": "9",
        "CAIRN_AGENT_SHUTDOWN_GRACE": "0",
        "CAIRN_LOG_LEVEL": "debug",
        "CAIRN_LLM": "OpenAI",
        "CAIRN_LLM_BASE_URL": "http://localhost:8000/v1",
        "CAIRN_LLM_API_KEY": " sk-x ",
        "CAIRN_LLM_MODEL": "llama-3",
        "CAIRN_LLM_TIMEOUT": "12.5",
        "CAIRN_HTTP_HOST": "0.0.0.0",
        "CAIRN_HTTP_PORT": "0",
        "CAIRN_API_TOKENS": "{}",
        "CAIRN_API_TOKENS_FILE": str(tmp_path / "tokens.yaml"),
        "CAIRN_HTTP_MAX_BODY": "4096",
        "CAIRN_CHAIN_KEY": "ab" * 32,
        "CAIRN_CHAIN_KEY_FILE": str(tmp_path / "chain.key"),
        "CAIRN_HEALTH_FILE": str(tmp_path / "health"),
        "CAIRN_CRASH_AT": "after-commit:2",
    }
    assert set(given) - {"NATS_URL"} == variables_read()
    parent = Settings.from_env(environ=given)
    defaults = Settings(home=parent.home)
    changed = {
        f.name
        for f in dataclasses.fields(Settings)
        if getattr(parent, f.name) != getattr(defaults, f.name)
    }
    assert changed == {f.name for f in dataclasses.fields(Settings)} - {"home"}
    child = Settings.from_env(environ=parent.env())
    assert child == dataclasses.replace(parent, health_file=None, crash_at=None)
    assert (parent.llm, parent.llm_api_key, parent.log_level) == ("openai", "sk-x", "DEBUG")
    assert parent.contract_modules == ("mine.contracts", "theirs.contracts")
    assert "secret" not in repr(parent)
    assert "sk-x" not in repr(parent)
    assert "ab" * 32 not in repr(parent)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CAIRN_AGENT_ACK_WAIT", "soon", "CAIRN_AGENT_ACK_WAIT must be a number, not 'soon'"),
        ("CAIRN_AGENT_CONCURRENCY", "2.5", "CAIRN_AGENT_CONCURRENCY must be a number, not '2.5'"),
        ("CAIRN_RESULT_ACK_WAIT", "x", "CAIRN_RESULT_ACK_WAIT must be a number of seconds, not"),
        ("CAIRN_BLOB_THRESHOLD", "16k", "CAIRN_BLOB_THRESHOLD must be a number of bytes"),
        ("CAIRN_LLM", "gpt", "CAIRN_LLM must be 'offline' or 'openai', not 'gpt'"),
        ("CAIRN_LLM_TIMEOUT", "-1", "CAIRN_LLM_TIMEOUT must be a positive number of seconds"),
        ("CAIRN_HTTP_PORT", "80000", "CAIRN_HTTP_PORT must be a port number from 0 to 65535"),
        ("CAIRN_HTTP_MAX_BODY", "1MB", "CAIRN_HTTP_MAX_BODY must be a number of bytes, not"),
        ("CAIRN_CRASH_AT", "after-commit:x", "CAIRN_CRASH_AT must name a crash point"),
        ("CAIRN_START_TIMEOUT", "-1", "CAIRN_START_TIMEOUT must be a number of seconds no smaller"),
        ("CAIRN_RESTART_LIMIT", "0", "CAIRN_RESTART_LIMIT must be a number no smaller than 1"),
        ("CAIRN_RESTART_WINDOW", "soon", "CAIRN_RESTART_WINDOW must be a number of seconds, not"),
    ],
)
def test_a_bad_value_is_one_sentence_naming_the_variable(
    name: str, value: str, message: str
) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        Settings.from_env(environ={name: value})
