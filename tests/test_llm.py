"""LLM clients: the deterministic offline model, and the chat-completions client against a
local HTTP server that speaks the protocol."""

from __future__ import annotations

import json
import math
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from cairn.agents import (
    OFFLINE_MODEL,
    LLMClient,
    LLMConfigError,
    LLMError,
    LLMPermanentError,
    NonRetryableError,
    OfflineModel,
    OpenAICompatibleClient,
    llm_from_env,
)
from cairn.runtime.embedded import free_port

# -- offline model ---------------------------------------------------------------------------


async def test_offline_model_is_deterministic() -> None:
    model = OfflineModel()
    first = await model.complete("You answer briefly.", "Why do heat pumps save energy?")
    again = await OfflineModel().complete("You answer briefly.", "Why do heat pumps save energy?")
    other = await model.complete("You answer briefly.", "How do tides depend on the moon?")
    assert first == again
    assert first.text != other.text
    assert first.model == OFFLINE_MODEL == "cairn-offline-1"
    assert first.text.strip()


async def test_offline_model_uses_the_prompts_words_and_counts_tokens() -> None:
    system, prompt = "Answer in two sentences.", "Explain photosynthesis in chloroplasts."
    completion = await OfflineModel().complete(system, prompt)
    assert {"photosynthesis", "chloroplasts"} & set(
        completion.text.lower().replace(".", "").split()
    )
    assert completion.input_tokens == math.ceil(len(system) / 4) + math.ceil(len(prompt) / 4)
    assert completion.output_tokens == math.ceil(len(completion.text) / 4)


async def test_offline_model_keeps_within_max_tokens() -> None:
    completion = await OfflineModel().complete(
        "s", "a long prompt about rivers " * 20, max_tokens=5
    )
    assert 0 < len(completion.text) <= 5 * 4
    assert completion.output_tokens <= 5


def test_clients_satisfy_the_protocol() -> None:
    assert isinstance(OfflineModel(), LLMClient)


# -- a local chat-completions server -----------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class ChatServer:
    """A tiny HTTP server answering POSTs from a queue of canned replies, recording requests."""

    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.seen: list[Seen] = []
        self.release = threading.Event()  # ends a delayed reply early at teardown
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                outer.seen.append(
                    Seen(
                        self.path, {k.lower(): v for k, v in self.headers.items()}, json.loads(raw)
                    )
                )
                reply = outer.replies.popleft() if outer.replies else Reply(body=completion("ok"))
                if reply.delay:
                    outer.release.wait(reply.delay)
                data = (
                    reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                )
                try:
                    self.send_response(reply.status)
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (timeout test)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def completion(text: str, *, usage: dict[str, int] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "test-model-2026",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


@pytest.fixture
def chat_server() -> Iterator[ChatServer]:
    with ChatServer() as server:
        yield server


async def test_openai_client_sends_the_chat_completions_request(chat_server: ChatServer) -> None:
    chat_server.replies.append(
        Reply(body=completion("Paris.", usage={"prompt_tokens": 21, "completion_tokens": 2}))
    )
    async with OpenAICompatibleClient(
        api_key="sk-test", model="test-model", base_url=chat_server.base_url + "/"
    ) as client:
        result = await client.complete("Be terse.", "Capital of France?", max_tokens=7)

    # The configured model name (the server answered with a dated snapshot name).
    assert (result.text, result.model) == ("Paris.", "test-model")
    assert (result.input_tokens, result.output_tokens) == (21, 2)
    [request] = chat_server.seen
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers["content-type"] == "application/json"
    assert request.body == {
        "model": "test-model",
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Capital of France?"},
        ],
        "max_tokens": 7,
    }


async def test_openai_client_asks_for_the_model_a_step_names(chat_server: ChatServer) -> None:
    chat_server.replies.append(Reply(body=completion("Lyon.")))
    async with OpenAICompatibleClient(
        api_key="k", model="test-model", base_url=chat_server.base_url
    ) as client:
        result = await client.complete("s", "p", model="bigger-model")
    assert result.model == "bigger-model"  # charged under the model that answered
    assert chat_server.seen[0].body["model"] == "bigger-model"


async def test_a_task_that_names_a_model_gets_it_from_ctx_llm() -> None:
    import uuid

    from cairn.agents import TaskContext
    from cairn.events import Intent, TaskEnvelope

    def context(llm: LLMClient, model: str | None) -> TaskContext:
        run_id = uuid.uuid4()
        envelope = TaskEnvelope(
            task_id=f"{run_id}:s:1", run_id=run_id, step="s", attempt=1, capability="c",
            input={}, intent=Intent(goal="g"), timeout_s=5, model=model,
        )  # fmt: skip
        return TaskContext(envelope, llm=llm, agent_id="c-1")

    default = await context(OfflineModel(), None).llm.complete("s", "tides and the moon")
    assert default.model == OFFLINE_MODEL
    ctx = context(OfflineModel(), "gpt-4o")
    named = await ctx.llm.complete("s", "tides and the moon")
    assert named.model == "gpt-4o"
    assert named.text != default.text  # the stand-in answers differently for another model
    assert [u.model for u in ctx.usage] == ["gpt-4o"]

    class OneModel:
        async def complete(self, system: str, prompt: str, *, max_tokens: int = 512) -> Any:
            return await OfflineModel().complete(system, prompt, max_tokens=max_tokens)

    assert (await context(OneModel(), None).llm.complete("s", "p")).model == OFFLINE_MODEL
    with pytest.raises(NonRetryableError, match=r"asks for model 'gpt-4o'.*cannot switch models"):
        await context(OneModel(), "gpt-4o").llm.complete("s", "p")


async def test_openai_client_estimates_usage_when_the_server_reports_none(
    chat_server: ChatServer,
) -> None:
    chat_server.replies.append(Reply(body=completion("twelve chars")))
    async with OpenAICompatibleClient(api_key="k", base_url=chat_server.base_url) as client:
        result = await client.complete("abcd", "efgh")
    assert (result.input_tokens, result.output_tokens) == (2, 3)


async def test_openai_client_can_name_the_token_limit_differently(chat_server: ChatServer) -> None:
    async with OpenAICompatibleClient(
        api_key="k", base_url=chat_server.base_url, token_limit_param="max_completion_tokens"
    ) as client:
        await client.complete("s", "p", max_tokens=9)
    assert chat_server.seen[0].body["max_completion_tokens"] == 9
    assert "max_tokens" not in chat_server.seen[0].body


async def test_openai_client_reports_a_refused_key_clearly_without_retrying(
    chat_server: ChatServer,
) -> None:
    chat_server.replies.append(
        Reply(status=401, body={"error": {"message": "Incorrect API key provided"}})
    )
    async with OpenAICompatibleClient(api_key="bad", base_url=chat_server.base_url) as client:
        with pytest.raises(LLMPermanentError) as caught:
            await client.complete("s", "p")
    message = str(caught.value)
    assert "HTTP 401" in message
    assert "Incorrect API key provided" in message
    assert "CAIRN_LLM_API_KEY" in message
    assert isinstance(caught.value, NonRetryableError)
    assert len(chat_server.seen) == 1


async def test_openai_client_retries_server_errors(chat_server: ChatServer) -> None:
    chat_server.replies.extend(
        [
            Reply(
                status=503, body={"error": {"message": "overloaded"}}, headers={"Retry-After": "0"}
            ),
            Reply(status=429, body={"error": "slow down"}, headers={"Retry-After": "0"}),
            Reply(body=completion("fine")),
        ]
    )
    async with OpenAICompatibleClient(api_key="k", base_url=chat_server.base_url) as client:
        result = await client.complete("s", "p")
    assert result.text == "fine"
    assert len(chat_server.seen) == 3
    assert chat_server.seen[0].body == chat_server.seen[2].body  # retry-safe: same request


async def test_openai_client_gives_up_after_max_retries(chat_server: ChatServer) -> None:
    chat_server.replies.extend(
        Reply(status=500, body=b"internal error", headers={"Retry-After": "0"}) for _ in range(3)
    )
    async with OpenAICompatibleClient(
        api_key="k", base_url=chat_server.base_url, max_retries=2
    ) as client:
        with pytest.raises(LLMError) as caught:
            await client.complete("s", "p")
        assert not isinstance(caught.value, LLMPermanentError)
        assert "HTTP 500" in str(caught.value)
        assert "internal error" in str(caught.value)
        # The client stays usable after an error.
        assert (await client.complete("s", "p")).text == "ok"
    assert len(chat_server.seen) == 4


async def test_openai_client_times_out_clearly(chat_server: ChatServer) -> None:
    chat_server.replies.append(Reply(body=completion("late"), delay=5))
    async with OpenAICompatibleClient(
        api_key="k", base_url=chat_server.base_url, timeout=0.2, max_retries=0
    ) as client:
        with pytest.raises(LLMError, match=r"timed out after 0\.2s"):
            await client.complete("s", "p")


async def test_openai_client_rejects_a_reply_that_is_not_a_completion(
    chat_server: ChatServer,
) -> None:
    chat_server.replies.append(Reply(body=b"<html>proxy error</html>"))
    async with OpenAICompatibleClient(
        api_key="k", base_url=chat_server.base_url, max_retries=0
    ) as client:
        with pytest.raises(LLMError, match="other than a chat completion"):
            await client.complete("s", "p")


async def test_openai_client_names_an_unreachable_server() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    async with OpenAICompatibleClient(api_key="k", base_url=url, max_retries=0) as client:
        with pytest.raises(LLMError, match="cannot reach the LLM at"):
            await client.complete("s", "p")


# -- configuration ---------------------------------------------------------------------------


def test_llm_from_env_defaults_to_offline() -> None:
    assert isinstance(llm_from_env({}), OfflineModel)
    assert isinstance(llm_from_env({"CAIRN_LLM": "offline"}), OfflineModel)


async def test_llm_from_env_builds_an_openai_client() -> None:
    client = llm_from_env(
        {
            "CAIRN_LLM": "openai",
            "CAIRN_LLM_API_KEY": "sk-x",
            "CAIRN_LLM_BASE_URL": "http://localhost:8000/v1/",
            "CAIRN_LLM_MODEL": "llama-3",
            "CAIRN_LLM_TIMEOUT": "12.5",
        }
    )
    assert isinstance(client, OpenAICompatibleClient)
    assert client.url == "http://localhost:8000/v1/chat/completions"
    assert (client.model, client.timeout) == ("llama-3", 12.5)
    await client.aclose()


def test_llm_from_env_needs_a_key_for_openai() -> None:
    with pytest.raises(LLMConfigError, match="CAIRN_LLM_API_KEY"):
        llm_from_env({"CAIRN_LLM": "openai"})


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"CAIRN_LLM": "gpt"}, "CAIRN_LLM must be"),
        (
            {"CAIRN_LLM": "openai", "CAIRN_LLM_API_KEY": "k", "CAIRN_LLM_TIMEOUT": "soon"},
            "CAIRN_LLM_TIMEOUT",
        ),
    ],
)
def test_llm_from_env_names_the_wrong_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(LLMConfigError, match=names):
        llm_from_env(env)
