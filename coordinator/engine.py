"""The coordinator's hot path: facts in, decisions committed, messages out.

Results are handled in batches (whatever has arrived): each is decided against its run's state
in memory, all new events are saved in one transaction, then the outbox publishes what they call
for (acks awaited together), then the results are acked. That order is the durability contract:
commit → publish → ack. One writer per run: the lock serialises batches and commands, and the
store's optimistic concurrency catches any other writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from cairn.coordinator import spans
from cairn.coordinator.admission import admit
from cairn.coordinator.approvals import pending_approvals
from cairn.coordinator.domain.decide import decide_with_state
from cairn.coordinator.domain.facts import (
    ApprovalFact,
    BudgetFact,
    CancelFact,
    Fact,
    Policy,
    Rejected,
    ResultFact,
    StartRunFact,
    TimerFact,
    UnservedFact,
)
from cairn.coordinator.domain.fork import fork_fact
from cairn.coordinator.domain.state import RunState, evolve, fold
from cairn.coordinator.intake import InputError, admit_start
from cairn.coordinator.outbox import Outbox
from cairn.coordinator.tenants import TenantLedger, TenantLimits
from cairn.coordinator.timers import TimerQueue
from cairn.coordinator.verdicts import AGAIN, DECIDED, Received, Stats, Verdict
from cairn.coordinator.workflow import WorkflowCatalog, WorkflowError
from cairn.events import (
    TERMINAL_EVENTS,
    ApprovalDecision,
    CancelRun,
    CommandReply,
    Event,
    ForkRun,
    Intent,
    RaiseBudget,
    RunStarted,
    StartRun,
    TaskDispatched,
)
from cairn.runtime import tracing
from cairn.runtime.crashpoints import crash_point
from cairn.runtime.eventlog.store import ConcurrencyError, EventStore, LoggedEvent

log = logging.getLogger("cairn.coordinator")

# How long a task another coordinator committed may wait for its result before this one sends
# it again (deduplicated by the stream if it was sent).
FOREIGN_TASK_GRACE_S = 10.0


class Coordinator:
    """Owns the state of active runs and turns facts into committed, published decisions."""

    def __init__(
        self,
        store: EventStore,
        policy: Policy,
        catalog: WorkflowCatalog,
        outbox: Outbox,
        tenant_limits: TenantLimits | None = None,
    ) -> None:
        self.store = store
        self.keys = store.chain_key(create=True)  # the tasks' keys are derived from it
        self.policy = policy
        self.tenant_limits = tenant_limits
        self.ledger = TenantLedger()
        self.catalog = catalog
        self.outbox = outbox
        self.runs: dict[uuid.UUID, RunState] = {}
        self.stats = Stats()
        self.timers = TimerQueue()
        self._timers_changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._starts: list[tuple[StartRunFact, asyncio.Future[CommandReply]]] = []
        self._start_batches: set[asyncio.Task[None]] = set()
        # Following the log for what other coordinators commit: how far it is folded in, the
        # positions this one committed past that point, and their tasks to check on.
        self.followed = 0
        self._own: set[int] = set()
        self._foreign_tasks: dict[str, tuple[float, TaskDispatched]] = {}

    # -- recovery ---------------------------------------------------------------------------

    def recover(self) -> int:
        """Rebuild the state of every unfinished run from the log."""
        states: dict[uuid.UUID, RunState] = {}
        position = 0
        self.ledger = TenantLedger()
        counts_from = datetime.now(UTC).date() - timedelta(days=1)  # tenants' days that matter
        while batch := self.store.read_log(position, limit=5000):
            for item in batch:
                event = item.event
                state = states[event.run_id] = evolve(states.get(event.run_id), event)
                if event.at.date() >= counts_from:
                    self.ledger.stage([event], state.tenant)
            self.ledger.commit()
            position = batch[-1].position
        self.runs = {run_id: s for run_id, s in states.items() if not s.terminal}
        self.timers = TimerQueue()
        for state in self.runs.values():
            self.timers.add_for_state(state)
        self.followed = position
        self._own.clear()
        return len(self.runs)

    # -- other coordinators -----------------------------------------------------------------

    async def follow(self, grace_s: float = FOREIGN_TASK_GRACE_S) -> int:
        """Fold into memory what other coordinators sharing the store committed since the last
        look; return how many of their events that was.

        Every coordinator then holds every active run: a result or command for any run finds
        fresh state (so conflicts stay rare), each run's timers live in every coordinator (the
        first to decide a timer wins; the others' attempt conflicts and changes nothing), and
        the runs of a coordinator that died go on in the others. A task another coordinator
        committed and that is still waiting for its result after `grace_s` is sent again: the
        stream drops it if it was sent, and it reaches an agent if its coordinator died
        between commit and publish.
        """
        folded = 0
        async with self._lock:
            last = self.store.last_position()
            pending = last - self.followed
            own = sum(1 for p in self._own if p <= last)
            if pending > own:  # someone else wrote: read what is new
                while self.followed < last:
                    batch = self.store.read_log(self.followed, limit=5000)
                    if not batch:
                        break
                    for item in batch:
                        if item.position not in self._own:
                            self._absorb(item.event)
                            folded += 1
                    self.followed = batch[-1].position
                self.ledger.commit()
            else:
                self.followed = max(self.followed, last)
            self._own = {p for p in self._own if p > self.followed}
            overdue = self._overdue_tasks(time.monotonic(), grace_s)
        if overdue:
            await self.outbox.republish_tasks(overdue, self.runs)
        return folded

    def _absorb(self, event: Event) -> None:
        """One event another coordinator committed, into the run's state in memory."""
        run_id = event.run_id
        state = self.runs.get(run_id)
        if state is None:
            if isinstance(event, RunStarted):
                state = evolve(None, event)
            elif isinstance(event, TERMINAL_EVENTS):
                return  # a run that ended: nothing to hold
            else:
                state = self._state(run_id)  # loaded whole, this event included
                if state is not None:
                    self.ledger.stage([event], state.tenant)
                return
        elif event.seq <= state.version:
            return  # this coordinator has it already
        elif event.seq > state.version + 1:
            self.runs.pop(run_id, None)  # a gap: take the stored truth
            self._state(run_id)
            return
        else:
            state = evolve(state, event)
        self.ledger.stage([event], state.tenant)
        if state.terminal:
            self.runs.pop(run_id, None)
            return
        self.runs[run_id] = state
        before = self.timers.next_due()
        self.timers.add_for_events([event])
        if self.timers.next_due() != before:
            self._timers_changed.set()
        if isinstance(event, TaskDispatched):
            self._foreign_tasks[event.task_id] = (time.monotonic(), event)

    def _overdue_tasks(self, now: float, grace_s: float) -> list[TaskDispatched]:
        overdue = []
        for waiting, (seen, event) in list(self._foreign_tasks.items()):
            if now - seen < grace_s:
                continue
            del self._foreign_tasks[waiting]
            if self.is_current(event):
                overdue.append(event)
        return overdue

    def is_current(self, event: TaskDispatched) -> bool:
        """The task is still wanted by a run this coordinator holds."""
        state = self.runs.get(event.run_id)
        return state is not None and state.is_current(event.step, event.task_id)

    async def catch_up(self) -> int:
        async with self._lock:
            return await self.outbox.catch_up(self.is_current, self.runs)

    # -- commands ---------------------------------------------------------------------------

    async def start_run(self, command: StartRun, at: datetime | None = None) -> CommandReply:
        try:
            spec = admit_start(command, self.catalog)  # the workflow; the input checked
        except (WorkflowError, InputError) as exc:
            return CommandReply(ok=False, error=str(exc))
        run_id = command.run_id or uuid.uuid4()
        intent = command.intent or Intent(
            goal=str(command.input.get("goal") or spec.description or spec.name)
        )
        trace_id, trace_span_id = tracing.current_ids()  # the start command's span: the root
        fact = StartRunFact(
            run_id=run_id,
            workflow=spec,
            input=command.input,
            intent=intent,
            requested_by=command.requested_by,
            at=at or datetime.now(UTC),
            budget=command.budget,
            tenant=command.tenant,
            trace_id=trace_id,
            trace_span_id=trace_span_id,
        )
        # Group commit: starts that arrive while a batch is being decided or committed wait
        # and go into the next transaction together (one commit, not one each).
        reply: asyncio.Future[CommandReply] = asyncio.get_running_loop().create_future()
        self._starts.append((fact, reply))
        if len(self._starts) == 1:
            self._start_batches.add(task := asyncio.create_task(self._start_batch()))
            task.add_done_callback(self._start_batches.discard)
        return await reply

    async def _start_batch(self) -> None:
        async with self._lock:
            starts, self._starts = self._starts, []
            try:
                await self._commit_starts(starts)
            except ConcurrencyError:
                # Another writer has one of these run ids: commit them one by one, so only the
                # start that collides fails.
                for start in starts:
                    with contextlib.suppress(ConcurrencyError):
                        await self._commit_starts([start])
            except Exception as exc:
                for _, reply in starts:
                    if not reply.done():
                        reply.set_exception(exc)

    async def _commit_starts(
        self, starts: Sequence[tuple[StartRunFact, asyncio.Future[CommandReply]]]
    ) -> None:
        tentative: dict[uuid.UUID, RunState] = {}
        events: list[Event] = []
        replies: list[tuple[asyncio.Future[CommandReply], CommandReply]] = []
        for fact, reply in starts:
            try:
                state = tentative.get(fact.run_id) or self._state(fact.run_id)
                if state is None:  # the same command again answers, and changes nothing
                    new, state = self._decide(None, fact, fact.tenant)
                    assert state is not None
                    tentative[fact.run_id] = state
                    events.extend(new)
            except Exception as exc:  # this start fails alone
                reply.set_exception(exc)
                continue
            replies.append((reply, CommandReply(ok=True, run_id=fact.run_id, status=state.status)))
        try:
            await self._commit_and_publish(tentative, events)
        except ConcurrencyError as exc:
            if len(starts) == 1 and not starts[0][1].done():
                starts[0][1].set_exception(exc)
            raise
        for reply, answer in replies:
            if not reply.done():
                reply.set_result(answer)

    async def fork_run(self, command: ForkRun, at: datetime | None = None) -> CommandReply:
        """Start a new run from a run's state after event `at_seq`; what it takes over and what
        runs again is decided by `domain/fork.py`."""
        parent = self.store.load(command.parent_run_id)
        trace_id, trace_span_id = tracing.current_ids()  # the fork command's span: the root
        try:
            fact = fork_fact(
                parent,
                command,
                self.policy.contract,
                run_id=command.run_id or uuid.uuid4(),
                at=at or datetime.now(UTC),
                trace_id=trace_id,
                trace_span_id=trace_span_id,
            )
        except Rejected as exc:
            return CommandReply(ok=False, error=str(exc))
        async with self._lock:
            if self._state(fact.run_id) is not None:
                return CommandReply(ok=False, error=f"run {fact.run_id} already exists")
            events, new = self._decide(None, fact, fact.tenant)
            assert new is not None
            await self._commit_and_publish({fact.run_id: new}, events)
        return CommandReply(ok=True, run_id=fact.run_id, status=new.status)

    async def cancel_run(self, command: CancelRun, at: datetime | None = None) -> CommandReply:
        fact = CancelFact(
            run_id=command.run_id,
            requested_by=command.requested_by,
            reason=command.reason,
            at=at or datetime.now(UTC),
        )
        return await self._command(command.run_id, fact)

    async def decide_approval(
        self, command: ApprovalDecision, approve: bool, at: datetime | None = None
    ) -> CommandReply:
        fact = ApprovalFact(
            run_id=command.run_id,
            step=command.step,
            by=command.by,
            approve=approve,
            reason=command.reason,
            at=at or datetime.now(UTC),
        )
        return await self._command(command.run_id, fact)

    async def raise_budget(self, command: RaiseBudget, at: datetime | None = None) -> CommandReply:
        fact = BudgetFact(
            run_id=command.run_id,
            usd=command.usd,
            tokens=command.tokens,
            by=command.by,
            reason=command.reason,
            at=at or datetime.now(UTC),
        )
        return await self._command(command.run_id, fact)

    def pending_approvals(self) -> list[dict[str, Any]]:
        """Open approval requests of the runs this coordinator owns, oldest first."""
        return pending_approvals(self.runs.values())

    async def _command(self, run_id: uuid.UUID, fact: Fact) -> CommandReply:
        async with self._lock:
            state = self._state(run_id)
            if state is None:
                return CommandReply(ok=False, run_id=run_id, error=f"unknown run {run_id}")
            try:
                events, after = self._decide_rechecked(state, fact)
                assert after is not None
                try:
                    await self._commit_and_publish({run_id: after}, events)
                except ConcurrencyError:
                    # Another coordinator changed the run since this one last saw it: decide
                    # the command again against the stored truth (a second conflict is an error).
                    self.stats.conflicts += 1
                    newer = self._newer(state)
                    assert newer is not None
                    events, after = self._decide(newer, fact, newer.tenant)
                    assert after is not None
                    await self._commit_and_publish({run_id: after}, events)
            except Rejected as exc:
                return CommandReply(ok=False, run_id=run_id, error=str(exc))
        return CommandReply(ok=True, run_id=run_id, status=after.status)

    # -- results (the hot path) -------------------------------------------------------------

    async def handle_results(self, received: Sequence[Received]) -> list[Verdict]:
        """Decide and commit one batch of results, publish what the decisions call for, and
        say what became of each result (in order): the caller acks, dead-letters or hands
        back each message only after this returns, which keeps commit → publish → ack."""
        at = datetime.now(UTC)
        verdicts: list[Verdict] = []
        async with self._lock:
            tentative: dict[uuid.UUID, RunState] = {}
            events: list[Event] = []
            for item in received:
                result = item.result
                state = tentative.get(result.run_id) or self._state(result.run_id)
                if state is None:
                    verdicts.append(Verdict.refuse(f"result for unknown run {result.run_id}"))
                    continue
                fact = ResultFact(result=result, at=at)
                try:
                    with spans.result_span(item.headers, result, state):
                        # A run decided earlier in this batch is newer than the store.
                        recheck = result.run_id not in tentative
                        new, after = self._decide_result(state, fact, item, recheck=recheck)
                except Rejected as exc:
                    verdicts.append(Verdict.refuse(str(exc)))
                    continue
                assert after is not None
                tentative[result.run_id] = after
                events.extend(new)
                verdicts.append(DECIDED)
            try:
                await self._commit_and_publish(tentative, events)
            except ConcurrencyError as exc:
                # Another writer got to one of these runs first: forget what we believed, and
                # let every result come back to be decided against the stored truth.
                self.stats.conflicts += 1
                log.warning("concurrent append, reloading %d run(s): %s", len(tentative), exc)
                for run_id in tentative:
                    self.runs.pop(run_id, None)
                return [AGAIN] * len(received)
        self.stats.results += len(received)
        self.stats.batches += 1
        return verdicts

    def _decide_result(
        self, state: RunState, fact: ResultFact, item: Received, *, recheck: bool
    ) -> tuple[list[Event], RunState | None]:
        """`_decide_rechecked` for a result that must first show it answers its task."""
        try:
            admit(state, item, self.keys)
            return self._decide(state, fact, state.tenant)
        except Rejected:
            newer = self._newer(state) if recheck else None
            if newer is None:
                raise
            admit(newer, item, self.keys)
            return self._decide(newer, fact, newer.tenant)

    # -- timers -----------------------------------------------------------------------------

    async def run_timers(self, stop: asyncio.Event) -> None:
        """Fire timeouts and retries as they come due, until `stop` is set."""
        while not stop.is_set():
            self._timers_changed.clear()  # before looking, so no new timer slips past
            now = datetime.now(UTC)
            due = self.timers.due(now)
            if due:
                await self.fire([t.fact(now) for t in due])
                continue
            next_due = self.timers.next_due()
            wait = 1.0 if next_due is None else min(1.0, (next_due - now).total_seconds())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timers_changed.wait(), max(wait, 0.001))

    async def fire(self, facts: Sequence[TimerFact | UnservedFact]) -> None:
        async with self._lock:
            tentative: dict[uuid.UUID, RunState] = {}
            events: list[Event] = []
            for fact in facts:
                state = tentative.get(fact.run_id) or self.runs.get(fact.run_id)
                if state is None:
                    continue  # the run ended since the timer was set
                new, after = self._decide(state, fact, state.tenant)
                if new and after is not None:
                    state = after
                    tentative[fact.run_id] = state
                    events.extend(new)
            self.stats.timers_fired += len(facts)
            try:
                await self._commit_and_publish(tentative, events)
            except ConcurrencyError as exc:
                # Another coordinator decided one of these runs first (perhaps this very
                # timer): decide each again, one run at a time, against the stored truth.
                self.stats.conflicts += 1
                log.info("concurrent append while firing timers, deciding again: %s", exc)
                for run_id in tentative:
                    self.runs.pop(run_id, None)
                for fact in facts:
                    if fact.run_id in tentative:
                        await self._decide_again(fact)

    async def _decide_again(self, fact: TimerFact | UnservedFact) -> None:
        """Decide a fact against the run's stored state and commit it alone (lock held)."""
        state = self._state(fact.run_id)
        if state is None or state.terminal:
            return
        try:
            new, after = self._decide(state, fact, state.tenant)
        except Rejected:
            return
        if new and after is not None:
            with contextlib.suppress(ConcurrencyError):
                await self._commit_and_publish({fact.run_id: after}, new)

    # -- shared -----------------------------------------------------------------------------

    def _decide(
        self, state: RunState | None, fact: Fact, tenant: str
    ) -> tuple[list[Event], RunState | None]:
        """`decide` and the state it leads to, told what the run's tenant has left today when
        it has a daily limit; the decision's spending is staged in the ledger until its events
        are stored."""
        policy = self.policy
        limit = self.tenant_limits.get(tenant) if self.tenant_limits is not None else None
        if limit is not None:
            allowance = self.ledger.allowance(tenant, fact.at.date(), limit)
            if allowance is not None:
                policy = replace(policy, tenant=allowance)
        with spans.deciding(state, fact) as traced:
            events, after = decide_with_state(state, fact, policy)
            traced.decided(events)
        self.ledger.stage(events, tenant)
        return events, after

    def _decide_rechecked(
        self, state: RunState, fact: Fact, *, recheck: bool = True
    ) -> tuple[list[Event], RunState | None]:
        """`_decide`; a fact refused by this coordinator's view of the run is judged again by
        the stored truth (another coordinator may have moved the run on just now, e.g.
        dispatched the task whose result this is)."""
        try:
            return self._decide(state, fact, state.tenant)
        except Rejected:
            newer = self._newer(state) if recheck else None
            if newer is None:
                raise
            return self._decide(newer, fact, newer.tenant)

    def _newer(self, state: RunState) -> RunState | None:
        """The run's stored state when the store holds events this coordinator has not taken
        in yet (another coordinator wrote them); None when its view is current."""
        stored = fold(self.store.load(state.run_id))
        if stored is None or stored.version <= state.version:
            return None
        if stored.terminal:
            self.runs.pop(state.run_id, None)
        else:
            self.runs[state.run_id] = stored
            self.timers.add_for_state(stored)
        return stored

    def _state(self, run_id: uuid.UUID) -> RunState | None:
        state = self.runs.get(run_id)
        if state is None:
            state = fold(self.store.load(run_id))
            if state is not None and not state.terminal:
                # Not in memory but unfinished (dropped after a conflict): adopt it again.
                self.runs[run_id] = state
                self.timers.add_for_state(state)
        return state

    async def _commit_and_publish(
        self, states: dict[uuid.UUID, RunState], events: Sequence[Event]
    ) -> list[LoggedEvent]:
        if not events:
            return []
        crash_point("before-commit")
        try:
            with spans.run_spans("append", states, events):
                positions = self.store.append(events)
        except BaseException:
            self.ledger.rollback()
            raise
        self.ledger.commit()
        crash_point("after-commit")
        self._own.update(positions)
        for run_id, state in states.items():
            if state.terminal:
                self.runs.pop(run_id, None)  # memory stays flat in the number of finished runs
            else:
                self.runs[run_id] = state
        logged = [LoggedEvent(p, e) for p, e in zip(positions, events, strict=True)]
        before = self.timers.next_due()
        self.timers.add_for_events(events)
        if len(self.timers) > 1000 + 8 * len(self.runs):
            self.timers.compact(lambda timer: timer.matters(self.runs.get(timer.run_id)))
        if self.timers.next_due() != before:
            self._timers_changed.set()
        self.stats.events += len(events)
        for event in events:
            name = event.type_name()
            self.stats.by_type[name] = self.stats.by_type.get(name, 0) + 1
        await self.outbox.publish(logged, states)
        crash_point("after-publish")
        return logged
