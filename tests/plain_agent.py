"""A planner agent written against docs/protocol.md with plain nats-py: no cairn code at all.

    python tests/plain_agent.py NATS_URL [AGENT_ID]

It binds to the durable consumer `cairn-agent-planner` on stream CAIRN_TASKS, answers each
task with a Plan@1 output (`{"title", "audience", "questions"}`) built from rules, publishes
the result (carrying back the envelope's `task_key`) on `cairn.result.planner.<run_id>` with
`Nats-Msg-Id: <task_id>`, waits for JetStream's ack, then acks the task. Prints
`ready <agent_id>` once bound; SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import sys
from datetime import UTC, datetime
from typing import Any

import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

CAPABILITY = "planner"
STREAM = "CAIRN_TASKS"
CONSUMER = f"cairn-agent-{CAPABILITY}"
ACK_WAIT = 30.0
MAX_DELIVER = 5
VERSION = 1
REQUIRED = ("task_id", "run_id", "step", "attempt", "capability", "input", "intent", "timeout_s")


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def plan(task_input: dict[str, Any]) -> dict[str, Any]:
    """Plan@1 from the step input {goal, topic, audience?}; ValueError if it is unusable."""
    topic = task_input.get("topic")
    goal = task_input.get("goal")
    if not isinstance(topic, str) or not topic.strip() or not isinstance(goal, str):
        raise ValueError("input needs a non-empty string 'topic' and a string 'goal'")
    audience = task_input.get("audience") or "general readers"
    topic = topic.strip()
    return {
        "title": f"{topic[:1].upper()}{topic[1:]}: a plain plan",
        "audience": audience,
        "questions": [
            f"What is {topic}?",
            f"Why does {topic} matter to {audience}?",
            f"How does {topic} serve the goal: {goal.strip().rstrip('.?!')}?",
        ],
    }


class PlainAgent:
    def __init__(self, nc: Any, js: JetStreamContext, agent_id: str) -> None:
        self.nc = nc
        self.js = js
        self.agent_id = agent_id

    async def bind(self) -> JetStreamContext.PullSubscription:
        config = ConsumerConfig(
            name=CONSUMER,
            durable_name=CONSUMER,
            filter_subject=f"cairn.task.{CAPABILITY}",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT,
            max_deliver=MAX_DELIVER,
        )
        delay = 0.1
        while True:
            try:
                await self.js.add_consumer(STREAM, config)
                break
            except NotFoundError:  # the coordinator has not declared the streams yet
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        return await self.js.pull_subscribe_bind(durable=CONSUMER, stream=STREAM)

    async def serve(self, sub: JetStreamContext.PullSubscription, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(1, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for msg in msgs:
                await self.handle(msg)

    async def handle(self, msg: Msg) -> None:
        started = now()
        try:
            envelope = json.loads(msg.data)
        except ValueError as exc:
            await self.dead_letter(msg, f"malformed JSON: {exc}")
            return
        if not isinstance(envelope, dict):
            await self.dead_letter(msg, "expected a JSON object (a TaskEnvelope)")
            return
        if envelope.get("v") != VERSION:
            await self.dead_letter(
                msg, f"unknown protocol version v={envelope.get('v')!r}; I speak v={VERSION}"
            )
            return
        missing = [f for f in REQUIRED if f not in envelope]
        if missing:
            await self.dead_letter(msg, f"not a TaskEnvelope: missing {missing}")
            return
        if envelope["capability"] != CAPABILITY:
            await self.dead_letter(msg, f"capability {envelope['capability']!r}")
            return

        heartbeat = asyncio.create_task(self.heartbeat(msg))
        try:
            try:
                output: dict[str, Any] | None = plan(envelope["input"])
                error = None
            except ValueError as exc:
                output, error = None, {"message": str(exc), "retryable": False}
            result = {
                "v": VERSION,
                "task_id": envelope["task_id"],
                "run_id": envelope["run_id"],
                "step": envelope["step"],
                "attempt": envelope["attempt"],
                "agent_id": self.agent_id,
                "output": output,
                "error": error,
                "usage": [],  # no model was called
                "started_at": started,
                "finished_at": now(),
                "task_key": envelope["task_key"],
            }
            await self.js.publish(
                f"cairn.result.{envelope['capability']}.{envelope['run_id']}",
                json.dumps(result).encode(),
                headers={"Nats-Msg-Id": envelope["task_id"]},
            )
        except BaseException:
            heartbeat.cancel()
            await msg.nak()  # not published: let another delivery try
            raise
        heartbeat.cancel()
        await msg.ack_sync()  # only now: the result is stored

    async def heartbeat(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(ACK_WAIT / 3)
            await msg.in_progress()

    async def dead_letter(self, msg: Msg, reason: str) -> None:
        letter = {
            "subject": msg.subject,
            "reason": reason,
            "payload": msg.data.decode("utf-8", errors="replace"),
            "received_at": now(),
            "service": f"agent:{self.agent_id}",
        }
        await self.js.publish(
            f"cairn.dlq.agent.{CAPABILITY}",
            json.dumps(letter).encode(),
            headers={"Nats-Msg-Id": f"{STREAM}:{msg.metadata.sequence.stream}"},
        )
        await msg.term()


async def main(url: str, agent_id: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nc = await nats.connect(url, name=f"plain-agent-{agent_id}")
    try:
        agent = PlainAgent(nc, nc.jetstream(), agent_id)
        sub = await agent.bind()
        print(f"ready {agent_id}", flush=True)
        try:
            await agent.serve(sub, stop)
        finally:
            await sub.unsubscribe()
    finally:
        await nc.close()


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: plain_agent.py NATS_URL [AGENT_ID]")
    default_id = f"plain-{CAPABILITY}-{secrets.token_hex(3)}"
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else default_id))
