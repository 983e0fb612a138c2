"""An AsyncAPI 3.0 description of cairn's wire protocol, generated from the code.

Channel addresses come from `protocol.py` (the subject constants and the subject functions,
called with `{parameter}` placeholders); message payloads are the pydantic models'
`model_json_schema()`, their shared definitions hoisted into `components.schemas` so that
every `$ref` resolves inside the one document. Nothing here is a hand-written schema.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from cairn.events import protocol, wire
from cairn.events.wire import (
    PROTOCOL_VERSION,
    CommandReply,
    DeadLetter,
    EventNotice,
    TaskEnvelope,
    TaskResult,
)

ASYNCAPI_VERSION = "3.0.0"
SCHEMA_REF = "#/components/schemas/{model}"

# Headers of the JetStream publishes whose duplicates must be dropped.
_MSG_ID_HEADERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "Nats-Msg-Id": {
            "type": "string",
            "description": "JetStream de-duplication id: the task_id for results.",
        }
    },
}


@dataclass(frozen=True)
class Channel:
    """One subject (or subject pattern) and what travels on it."""

    key: str
    address: str
    parameters: dict[str, str]
    description: str
    message: type[BaseModel] | None
    # From the coordinator's side: "send" (it publishes) or "receive" (it subscribes).
    action: str
    reply: type[BaseModel] | None = None
    headers: bool = False


def _pattern(subject: Callable[..., str], **descriptions: str) -> tuple[str, dict[str, str]]:
    """A subject function's address with `{name}` placeholders for its parameters."""
    names = list(inspect.signature(subject).parameters)
    if set(names) != set(descriptions):
        raise ValueError(f"{subject.__name__} takes {names}, described: {sorted(descriptions)}")
    placeholders: dict[str, Any] = {name: "{" + name + "}" for name in names}
    return subject(**placeholders), descriptions


def command_subjects() -> dict[str, str]:
    """Every command subject `protocol.py` defines: constant name → subject."""
    return {
        name: value
        for name, value in vars(protocol).items()
        if name.startswith("CMD_") and isinstance(value, str)
    }


# Commands without a request model: the body is `{}`.
_BARE_COMMANDS = {
    "CMD_APPROVALS": "List pending approvals (request body `{}`; the reply's `data`).",
    "CMD_PING": "Liveness: request body `{}`; replies with a JSON object of counters.",
}
_SUBJECT_IN_DOC = re.compile(r"`(cairn\.cmd\.[A-Za-z0-9_-]+)`")


def command_models() -> dict[str, type[BaseModel]]:
    """Command subject → request model, from the wire models' docstrings ("Command on `...`")."""
    found: dict[str, type[BaseModel]] = {}
    for value in vars(wire).values():
        if isinstance(value, type) and issubclass(value, BaseModel) and value.__doc__:
            if value.__module__ != wire.__name__:
                continue
            for subject in _SUBJECT_IN_DOC.findall(value.__doc__):
                found[subject] = value
    return found


def channels() -> list[Channel]:
    """The channels of the protocol, in the order the document lists them."""
    task, task_params = _pattern(
        protocol.task_subject, capability="The capability the task is for, e.g. planner."
    )
    result, result_params = _pattern(
        protocol.result_subject,
        capability="The capability of the agent answering: only its NATS user may publish here.",
        run_id="The run's UUID.",
    )
    event, event_params = _pattern(
        protocol.event_subject,
        run_id="The run's UUID.",
        event_type="The event's type name, e.g. TaskCompleted.",
    )
    dlq, dlq_params = _pattern(
        protocol.dlq_subject,
        source='Who dead-lettered it: "coordinator", or "agent.<capability>".',
    )
    found = [
        Channel(
            "task",
            task,
            task_params,
            f"Tasks for agents. JetStream stream {protocol.TASKS_STREAM} (work queue); agents "
            f"bind to the durable pull consumer {protocol.agent_consumer('{capability}')}.",
            TaskEnvelope,
            "send",
        ),
        Channel(
            "result",
            result,
            result_params,
            f"Agents' results. JetStream stream {protocol.RESULTS_STREAM}; publish with header "
            "Nats-Msg-Id set to the task_id and wait for the JetStream ack. The result carries "
            "back the task_key its task was sent with; one on another capability's subject, "
            "or without the key, is dead-lettered.",
            TaskResult,
            "receive",
            headers=True,
        ),
        Channel(
            "event",
            event,
            event_params,
            "The live feed: every committed event of a run (core NATS, not stored).",
            EventNotice,
            "send",
        ),
        Channel(
            "dlq",
            dlq,
            dlq_params,
            f"Dead letters: messages that could not be processed, and why. JetStream stream "
            f"{protocol.DLQ_STREAM}.",
            DeadLetter,
            "send",
            headers=True,
        ),
    ]
    models = command_models()
    for name, subject in sorted(command_subjects().items(), key=lambda item: item[1]):
        model = models.get(subject)
        what = _BARE_COMMANDS.get(name) or _first_line(model) or f"The {subject} command."
        key = "cmd" + subject.rsplit(".", 1)[-1].capitalize()
        reply = CommandReply if name != "CMD_PING" else None
        found.append(Channel(key, subject, {}, f"{what} Request/reply.", model, "receive", reply))
    return found


def _schemas(models: list[type[BaseModel]]) -> dict[str, Any]:
    """Each model's JSON schema and its definitions, all under their names."""
    schemas: dict[str, Any] = {}

    def put(name: str, schema: dict[str, Any]) -> None:
        if name in schemas and schemas[name] != schema:
            raise ValueError(f"two different schemas are both named {name}")
        schemas[name] = schema

    for model in models:
        schema = dict(model.model_json_schema(ref_template=SCHEMA_REF))
        for name, definition in schema.pop("$defs", {}).items():
            put(name, definition)
        put(model.__name__, schema)
    return dict(sorted(schemas.items()))


def _message(name: str, model: type[BaseModel] | None, summary: str) -> dict[str, Any]:
    message: dict[str, Any] = {"name": name, "contentType": "application/json"}
    if model is not None:
        message["title"] = model.__name__
        message["payload"] = {"$ref": SCHEMA_REF.format(model=model.__name__)}
    if summary:
        message["summary"] = summary
    return message


def _first_line(model: type[BaseModel] | None) -> str:
    return _doc(model).split("\n\n", 1)[0].replace("\n", " ")


def _doc(model: type[BaseModel] | None) -> str:
    return inspect.cleandoc(model.__doc__ or "") if model is not None else ""


def asyncapi_document() -> dict[str, Any]:
    """The whole protocol as an AsyncAPI 3.0 document (plain JSON-able dicts)."""
    chans = channels()
    models: list[type[BaseModel]] = []
    for channel in chans:
        for model in (channel.message, channel.reply):
            if model is not None and model not in models:
                models.append(model)
    messages: dict[str, Any] = {}
    doc_channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for channel in chans:
        name = channel.message.__name__ if channel.message is not None else f"{channel.key}Request"
        if name not in messages:
            messages[name] = _message(name, channel.message, _doc(channel.message))
        if channel.headers:
            messages[name]["headers"] = _MSG_ID_HEADERS
        entry: dict[str, Any] = {
            "address": channel.address,
            "description": channel.description,
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
        }
        if channel.parameters:
            entry["parameters"] = {p: {"description": d} for p, d in channel.parameters.items()}
        operation: dict[str, Any] = {
            "action": channel.action,
            "channel": {"$ref": f"#/channels/{channel.key}"},
            "messages": [{"$ref": f"#/channels/{channel.key}/messages/{name}"}],
        }
        if channel.key.startswith("cmd"):
            reply = channel.reply.__name__ if channel.reply is not None else "PingReply"
            if reply not in messages:
                summary = (
                    _doc(channel.reply) or "A JSON object with ok and the coordinator's counters."
                )
                messages[reply] = _message(reply, channel.reply, summary)
            # Replies go to the requester's inbox: no fixed address.
            reply_key = f"{channel.key}Reply"
            doc_channels[reply_key] = {
                "address": None,
                "description": f"The reply inbox of {channel.address} requests.",
                "messages": {reply: {"$ref": f"#/components/messages/{reply}"}},
            }
            operation["reply"] = {
                "channel": {"$ref": f"#/channels/{reply_key}"},
                "messages": [{"$ref": f"#/channels/{reply_key}/messages/{reply}"}],
            }
        doc_channels[channel.key] = entry
        operations[f"{channel.action}_{channel.key}"] = operation
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "cairn wire protocol",
            "version": str(PROTOCOL_VERSION),
            "description": (
                "Subjects, streams and messages an agent or client speaks to join cairn over "
                "NATS, from the coordinator's point of view. Every task and result carries "
                f"`v` = {PROTOCOL_VERSION}. See docs/protocol.md."
            ),
        },
        "defaultContentType": "application/json",
        "channels": dict(sorted(doc_channels.items())),
        "operations": operations,
        "components": {"messages": messages, "schemas": _schemas(models)},
    }
