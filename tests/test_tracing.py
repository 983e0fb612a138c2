"""Tracing: one trace per run across real processes, exported over OTLP/HTTP to a receiver in
the test that decodes the protocol's protobuf messages; the trace id in every stored event;
nothing recorded or sent when tracing is off."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import run_to_end
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from cairn.benchmarks.logwork import pipeline_spec
from cairn.coordinator import spans as coordinator_spans
from cairn.coordinator.domain.decide import decide, decide_with_state
from cairn.coordinator.domain.facts import CancelFact, Policy, ResultFact, StartRunFact, TimerFact
from cairn.coordinator.domain.state import fold
from cairn.coordinator.history.replay import check_history
from cairn.coordinator.history.verify import verify_store
from cairn.coordinator.pricing import load_price_table
from cairn.events import (
    CostCharged,
    Event,
    Intent,
    RunStarted,
    TaskDispatched,
    TaskResult,
    Usage,
    canonical_json,
    decode_event,
    encode_event,
    event_hash,
    topic_of,
)
from cairn.events.contracts import resolve_contract
from cairn.projections import Views, wait_for_views
from cairn.runtime import tracing
from cairn.runtime.client import CairnClient
from cairn.runtime.eventlog.store import EventStore
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import Supervisor

KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
AGENTS = ("planner", "researcher", "writer", "reviewer")


# -- an OTLP/HTTP receiver ---------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    trace_id: str
    span_id: str
    parent: str  # "" for a root
    name: str
    kind: str
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]  # (trace id, span id)


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, which) if which else None


@dataclass
class Receiver:
    """Takes `POST /v1/traces` (protobuf, optionally gzipped) as a collector does."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)

    def take(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        ReceivedSpan(
                            service=str(resource.get("service.name")),
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent=span.parent_span_id.hex(),
                            name=span.name,
                            kind=KINDS.get(span.kind, str(span.kind)),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            links=tuple((ln.trace_id.hex(), ln.span_id.hex()) for ln in span.links),
                        )
                    )
        with self.changed:
            self.requests += 1
            self.spans.extend(found)
            self.changed.notify_all()

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float, what: str
    ) -> list[ReceivedSpan]:
        with self.changed:
            if not self.changed.wait_for(lambda: predicate(self.spans), timeout):
                names = sorted({s.name for s in self.spans})
                raise AssertionError(f"timed out waiting for {what}; spans so far: {names}")
            return list(self.spans)


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    received = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            received.take(body)
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield received, f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def otel_env(monkeypatch: pytest.MonkeyPatch, endpoint: str, **extra: str) -> None:
    """The children's OTEL_* settings (they inherit this process's environment)."""
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # milliseconds: spans arrive quickly
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name, value in extra.items():
        monkeypatch.setenv(name, value)


def cli(settings: Settings, *args: str) -> str:
    env = {**os.environ, **settings.env(), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "cairn.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout


# -- across processes -------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_a_run_is_one_trace_across_coordinator_and_agent_processes(
    settings: Settings,
    supervisor: Supervisor,
    client: CairnClient,
    receiver: tuple[Receiver, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    received, endpoint = receiver
    otel_env(monkeypatch, endpoint)
    supervisor.start_all()
    await client.wait_ready(timeout=30)

    # A traced caller: its span is the parent of the run's root.
    caller = SpanContext(
        int(uuid.uuid4().hex, 16), int(uuid.uuid4().hex[:16], 16), True, TraceFlags(1)
    )
    with trace.use_span(NonRecordingSpan(caller)):
        run_id, notices = await run_to_end(client, "research-report", {"topic": "tides"})
    assert notices[-1].type == "RunCompleted", notices[-1]
    trace_id = format(caller.trace_id, "032x")

    # Every event of the run records the trace; RunStarted also its root span.
    store = EventStore(settings.store)
    events = store.load(run_id)
    assert {e.trace_id for e in events} == {trace_id}
    assert all(n.event["trace_id"] == trace_id for n in notices)
    started = events[0]
    assert isinstance(started, RunStarted)
    root_id = started.trace_span_id
    assert root_id is not None

    # The stored trace ids are part of what the hash chains cover, and the chains hold.
    reports = verify_store(store, [run_id])
    assert [r.ok for r in reports] == [True]

    # The run's page (and its API) names the trace, so a look at a run leads to it.
    from cairn.projections.http.api import run_detail
    from cairn.projections.http.backend import Backend

    await asyncio.to_thread(wait_for_views, settings.views, notices[-1].position, 15.0)
    backend = Backend(settings)
    try:
        assert (await run_detail(backend, str(run_id))).trace_id == trace_id
    finally:
        await backend.close()

    # A second run, from a caller that is not traced: a trace of its own.
    other_id, _ = await run_to_end(client, "research-report", {"topic": "reefs"})
    other_events = store.load(other_id)
    other_trace = other_events[0].trace_id
    assert other_trace is not None
    assert other_trace != trace_id
    assert {e.trace_id for e in other_events} == {other_trace}

    def complete(spans: list[ReceivedSpan]) -> bool:
        for wanted in (trace_id, other_trace):
            mine = [s for s in spans if s.trace_id == wanted]
            agents = [s for s in mine if s.name.startswith("invoke_agent ")]
            results = [s for s in mine if s.name == "process cairn.result"]
            decisions = [s for s in mine if s.name == "decide result"]
            publishes = [s for s in mine if s.name == "publish"]
            if not (len(agents) == len(results) == len(decisions) == 4 and len(publishes) >= 5):
                return False
        return True

    spans = await asyncio.to_thread(received.wait_for, complete, 30, "both runs' spans")
    mine = [s for s in spans if s.trace_id == trace_id]
    by_id = {s.span_id: s for s in spans}

    # Every span that names the run is in its trace, and the trace holds no other run's.
    assert all(
        s.trace_id == trace_id for s in spans if s.attributes.get("cairn.run_id") == str(run_id)
    )
    assert {s.attributes.get("cairn.run_id") for s in mine} <= {str(run_id), None}
    assert {s.service for s in mine} == {"cairn-coordinator", *(f"cairn-agent-{a}" for a in AGENTS)}

    # The root: the start command's span, a child of the caller's.
    [root] = [s for s in mine if s.span_id == root_id]
    assert (root.name, root.kind, root.service) == (
        "process cairn.cmd.start",
        "server",
        "cairn-coordinator",
    )
    assert root.parent == format(caller.span_id, "016x")
    assert root.attributes["messaging.system"] == "nats"
    [first] = [s for s in mine if s.name == "decide start"]
    assert first.parent == root_id
    for name in ("append", "publish"):
        assert all(s.parent == root_id for s in mine if s.name == name)
    assert {s.kind for s in mine if s.name == "publish"} == {"producer"}

    # Agents' spans are children of the coordinator's decision that dispatched their task
    # (across processes, by the task message's traceparent header), with GenAI attributes
    # that match what the coordinator charged.
    charges = [e for e in events if isinstance(e, CostCharged)]
    dispatched = [e for e in events if isinstance(e, TaskDispatched)]
    agent_spans = {
        s.attributes["cairn.task_id"]: s for s in mine if s.name.startswith("invoke_agent ")
    }
    assert set(agent_spans) == {d.task_id for d in dispatched}
    for task in dispatched:
        span = agent_spans[task.task_id]
        assert span.name == f"invoke_agent {task.capability}"
        assert (span.kind, span.service) == ("consumer", f"cairn-agent-{task.capability}")
        parent = by_id[span.parent]
        assert parent.service == "cairn-coordinator"
        assert parent.name in ("decide start", "decide result")
        attributes = span.attributes
        assert attributes["gen_ai.operation.name"] == "invoke_agent"
        assert attributes["gen_ai.agent.name"] == task.capability
        assert attributes["gen_ai.provider.name"] == "cairn.offline"
        charged = [c for c in charges if c.task_id == task.task_id]
        assert charged, f"no usage charged for {task.task_id}"
        assert attributes["gen_ai.request.model"] == charged[0].model
        assert attributes["gen_ai.usage.input_tokens"] == sum(c.input_tokens for c in charged)
        assert attributes["gen_ai.usage.output_tokens"] == sum(c.output_tokens for c in charged)
        # The model calls the agent made, each a child of its span.
        calls = [s for s in mine if s.parent == span.span_id and s.name.startswith("chat ")]
        assert calls
        assert {c.kind for c in calls} == {"client"}
        assert sum(c.attributes["gen_ai.usage.input_tokens"] for c in calls) == sum(
            c.input_tokens for c in charged
        )

    # The coordinator's handling of each result is a child of the agent's span (the result
    # message's header), and the decision it led to a child of that.
    for result in [s for s in mine if s.name == "process cairn.result"]:
        assert (result.kind, result.service) == ("consumer", "cairn-coordinator")
        agent = by_id[result.parent]
        assert agent.name.startswith("invoke_agent ")
        assert agent.attributes["cairn.task_id"] == result.attributes["cairn.task_id"]
        [decision] = [s for s in mine if s.name == "decide result" and s.parent == result.span_id]
        assert decision.service == "cairn-coordinator"

    # The untraced caller's run has a root of its own.
    other_start = other_events[0]
    assert isinstance(other_start, RunStarted)
    [other_root] = [s for s in spans if s.span_id == other_start.trace_span_id]
    assert other_root.parent == ""
    assert other_root.trace_id == other_trace

    # From an audit row to the trace: the views and the CLI show each event's trace id.
    await asyncio.to_thread(wait_for_views, settings.views, notices[-1].position, 15.0)
    with Views(settings.views) as views:
        audit = views.audit(run_id=str(run_id), limit=1000)
    assert len(audit) == len(events)
    assert {row.trace_id for row in audit} == {trace_id}
    rows = json.loads(cli(settings, "audit", "--run", str(run_id), "--format", "json"))
    assert {row["trace_id"] for row in rows} == {trace_id}
    history = json.loads(cli(settings, "history", str(run_id), "--json"))
    assert {e["trace_id"] for e in history["events"]} == {trace_id}


@pytest.mark.timeout(90)
async def test_tracing_off_records_no_trace_id_and_sends_nothing(
    settings: Settings,
    supervisor: Supervisor,
    client: CairnClient,
    receiver: tuple[Receiver, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    received, endpoint = receiver
    # An endpoint is configured, but the SDK is switched off: the standard way to turn it off.
    otel_env(monkeypatch, endpoint, OTEL_SDK_DISABLED="true")
    supervisor.start("coordinator", "cairn.coordinator")
    supervisor.start("agent-echo", "cairn.agents.examples.echo")
    await client.wait_ready(timeout=30)
    caller = SpanContext(int(uuid.uuid4().hex, 16), 1, True, TraceFlags(1))
    with trace.use_span(NonRecordingSpan(caller)):  # a traced caller changes nothing either
        run_id, notices = await run_to_end(client, pipeline_spec(), {"value": 7})
    assert notices[-1].type == "RunCompleted", notices[-1]
    events = EventStore(settings.store).load(run_id)
    assert all(e.trace_id is None for e in events)
    assert all("trace_id" not in n.event for n in notices)
    assert isinstance(events[0], RunStarted)
    assert events[0].trace_span_id is None
    # Stopped processes have flushed whatever they held: had they traced, it would be here.
    await asyncio.to_thread(supervisor.stop_all, 10.0)
    assert supervisor.exited() == {"coordinator": 0, "agent-echo": 0}
    assert received.requests == 0
    assert received.spans == []


# -- in process -------------------------------------------------------------------------------


def test_tracing_is_off_unless_the_standard_variables_turn_it_on() -> None:
    assert tracing.exporters_from_env({}) == []
    assert tracing.exporters_from_env({"OTEL_SERVICE_NAME": "x"}) == []
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert tracing.exporters_from_env(endpoint) == ["otlp"]
    assert tracing.exporters_from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c"}) == [
        "otlp"
    ]
    assert tracing.exporters_from_env({"OTEL_TRACES_EXPORTER": "console"}) == ["console"]
    assert tracing.exporters_from_env({"OTEL_TRACES_EXPORTER": "otlp, console"}) == [
        "otlp",
        "console",
    ]
    assert tracing.exporters_from_env({**endpoint, "OTEL_TRACES_EXPORTER": "none"}) == []
    assert tracing.exporters_from_env({**endpoint, "OTEL_SDK_DISABLED": "TRUE"}) == []
    with pytest.raises(tracing.TracingConfigError, match="otlp or console"):
        tracing.exporters_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})
    assert tracing.setup("cairn-test", {}) is False
    assert tracing.ENABLED is False
    assert tracing.current_ids() == (None, None)


AT = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
RUN = uuid.UUID("00000000-0000-4000-8000-00000000abcd")
TRACE = "0af7651916cd43dd8448eb211c80319c"
ROOT = "b7ad6b7169203331"


def _policy() -> Policy:
    return Policy(load_price_table(), resolve_contract)


def _start(trace_id: str | None = None, span_id: str | None = None) -> StartRunFact:
    return StartRunFact(
        run_id=RUN,
        workflow=pipeline_spec(),
        input={"value": 1},
        intent=Intent(goal="g"),
        requested_by="client:test",
        at=AT,
        trace_id=trace_id,
        trace_span_id=span_id,
    )


def _history(trace_id: str | None, span_id: str | None) -> list[Event]:
    """A whole run of the echo pipeline, decided as the coordinator decides it."""
    policy = _policy()
    events = list(decide(None, _start(trace_id, span_id), policy))
    state = fold(events)
    while state is not None and not state.terminal:
        step = next(s for s in state.steps.values() if s.status == "dispatched")
        result = TaskResult(
            task_id=step.task_id or "",
            run_id=RUN,
            step=step.name,
            attempt=step.attempt,
            agent_id="echo-1",
            output={"value": 1},
            usage=[Usage(model=next(iter(policy.prices.models)), input_tokens=3)],
            started_at=AT,
            finished_at=AT,
        )
        new, state = decide_with_state(state, ResultFact(result=result, at=AT), policy)
        events += new
    return events


def test_events_without_a_trace_keep_their_bytes_and_hashes() -> None:
    event = _history(None, None)[1]
    assert isinstance(event, TaskDispatched)
    stored = encode_event(event)
    assert b"trace_id" not in stored
    # The hash over the topic and exactly these members: no trace id among them.
    expected = {
        "run_id": str(RUN),
        "seq": 2,
        "at": "2026-05-01T12:00:00Z",
        "actor": "coordinator",
        "reason": event.reason,
        "prev_hash": event.prev_hash,
        "task_id": f"{RUN}:s1:1",
        "step": "s1",
        "attempt": 1,
        "capability": "echo",
        "input": {"value": 1},
        "intent": {"goal": "g", "constraints": [], "success_criteria": []},
        "lineage": [],
        "contract": None,
        "repair": [],
        "timeout_s": 60.0,
        "model": None,
    }
    topic = topic_of(event).encode()
    assert event_hash(event) == hashlib.sha256(topic + b"\n" + canonical_json(expected)).hexdigest()
    again = decode_event(topic_of(event), stored, RUN, 2)
    assert again == event
    assert event_hash(again) == event_hash(event)


def test_trace_ids_come_from_the_record_so_replay_decides_the_same_events() -> None:
    events = _history(TRACE, ROOT)
    assert {e.trace_id for e in events} == {TRACE}
    started = events[0]
    assert isinstance(started, RunStarted)
    assert started.trace_span_id == ROOT
    for event in events:  # stored, read back, and part of what the hash chain covers
        stored = encode_event(event)
        assert f'"trace_id":"{TRACE}"'.encode() in stored
        assert decode_event(topic_of(event), stored, RUN, event.seq) == event
    untraced = _history(None, None)
    assert event_hash(untraced[0]) != event_hash(started)
    assert check_history(events, _policy()).ok
    assert check_history(untraced, _policy()).ok
    assert all(e.trace_id is None for e in untraced)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        yield exporter
    finally:
        tracing.shutdown()
        provider.shutdown()


def test_decisions_are_traced_under_the_run_root_or_the_span_that_caused_them(
    spans: InMemorySpanExporter,
) -> None:
    policy = _policy()
    with coordinator_spans.deciding(None, _start(TRACE, ROOT)) as traced:
        events, state = decide_with_state(None, _start(TRACE, ROOT), policy)
        traced.decided(events)
    assert state is not None
    # A timer has no message behind it: its decision is a child of the run's root.
    timer = TimerFact(run_id=RUN, step="s1", attempt=1, kind="timeout", at=AT)
    with coordinator_spans.deciding(state, timer) as traced:
        traced.decided(decide(state, timer, policy))
    # A command from another trace: under the root, linked to the command's span.
    command = SpanContext(int("1" * 32, 16), int("2" * 16, 16), True, TraceFlags(1))
    cancel = CancelFact(run_id=RUN, requested_by="client:x", at=AT)
    with (
        trace.use_span(NonRecordingSpan(command)),
        coordinator_spans.deciding(state, cancel) as traced,
    ):
        traced.decided(decide(state, cancel, policy))
    # An untraced run gets no spans.
    with coordinator_spans.deciding(None, _start()) as traced:
        traced.decided(decide(None, _start(), policy))
    started, timed, cancelled = spans.get_finished_spans()
    for span in (started, timed, cancelled):
        assert span.context is not None
        assert span.parent is not None
        assert format(span.context.trace_id, "032x") == TRACE
        assert format(span.parent.span_id, "016x") == ROOT
    assert [s.name for s in (started, timed, cancelled)] == [
        "decide start",
        "decide timer",
        "decide cancel",
    ]
    assert started.attributes is not None
    assert started.attributes["cairn.events"] == len(events)
    assert [(ln.context.trace_id, ln.context.span_id) for ln in cancelled.links] == [
        (command.trace_id, command.span_id)
    ]
    assert started.kind is SpanKind.INTERNAL
    # The task the start dispatched carries the decision's span as its parent.
    dispatched = next(e for e in events if isinstance(e, TaskDispatched))
    headers: dict[str, str] = {}
    coordinator_spans.task_headers(dispatched, headers, state)
    assert headers["traceparent"] == f"00-{TRACE}-{started.context.span_id:016x}-01"
    # Sent again by other than its decision (after a restart): under the run's root.
    copy = dispatched.model_copy()
    coordinator_spans.task_headers(copy, headers := {}, state)
    assert headers["traceparent"] == f"00-{TRACE}-{ROOT}-01"
