"""LLM clients behind one small protocol: a deterministic offline model and any server that
speaks OpenAI's chat-completions protocol (OpenAI, vLLM, Ollama, LiteLLM, ...).

Agents call `ctx.llm.complete(...)`; which client stands behind it is configuration
(`llm_from_settings`), so the same agent runs offline in tests and demos and against a real model
in production.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import httpx
from pydantic import Field

from cairn.agents.errors import NonRetryableError
from cairn.events import Frozen
from cairn.runtime.settings import (
    DEFAULT_LLM_BASE_URL,
    DEFAULT_LLM_MODEL,
    Settings,
    SettingsError,
)

OFFLINE_MODEL = "cairn-offline-1"
DEFAULT_BASE_URL = DEFAULT_LLM_BASE_URL
DEFAULT_OPENAI_MODEL = DEFAULT_LLM_MODEL
CHARS_PER_TOKEN = 4


class Completion(Frozen):
    """What a model answered, and what it cost in tokens."""

    text: str
    model: str
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)


@runtime_checkable
class LLMClient(Protocol):
    """Anything that completes a system + user prompt. Implementations must be safe to call
    concurrently and to call again after an error.

    `model` names the model to use instead of the client's default (a workflow step may name
    one); a client that cannot switch models may leave the parameter out, and then serves only
    steps that name none."""

    async def complete(self, system: str, prompt: str, *, max_tokens: int = 512) -> Completion:
        """Answer `prompt` under the instructions in `system`, in at most `max_tokens` tokens."""
        ...


@runtime_checkable
class ClosableLLMClient(LLMClient, Protocol):
    """An LLM client holding resources (connections) that must be released."""

    async def aclose(self) -> None:
        """Release the client's resources."""
        ...


class LLMError(RuntimeError):
    """A model call failed in a way that may pass on retry (timeout, 429, 5xx, bad reply)."""


class LLMPermanentError(LLMError, NonRetryableError):
    """A model call was refused in a way a retry cannot fix (bad key, unknown model, 4xx)."""


class LLMConfigError(ValueError):
    """The CAIRN_LLM* settings are wrong; the message names the variable."""


def estimate_tokens(text: str) -> int:
    """Rough token count (~4 characters per token), for models that report none."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


# A stand-in model's sentences: plain statements about the subject the prompt names (the
# `Topic:` or `Title:` line, or the prompt itself), chosen and ordered by a hash of the call.
_ABOUT = (
    "The subject of {T} is well studied, and its main ideas are broadly agreed on.",
    "Observations and measurements give a fairly consistent picture of {T}.",
    "The short answer is that {T} comes down to a few causes that work together.",
    "For most readers, the key point is that {T} follows patterns that can be explained simply.",
    "Examples from everyday life make {T} easier to picture.",
    "Looking at {T} over a longer period shows slow changes that single observations miss.",
)
_BESIDES = (
    "How strongly each cause matters differs from case to case, so some details remain uncertain.",
    "A good way in is to separate what is measured directly from what is inferred.",
    "Specialists still debate the finer points, but not the overall picture.",
    "The clearest evidence comes from places where it has been measured for many years.",
    "What is known well is worth telling apart from what is still an open question.",
)
_ON_A_FINDING = (
    "Put simply, this is what matters most here.",
    "In other words, the answer rests on a small number of well-understood causes.",
    "It helps to keep in mind where the evidence is firm and where it is still thin.",
    "Readers who want more can follow each of these points further in the sources.",
)
_EDITOR = (
    'The report "{T}" reads clearly and keeps to the questions it sets out.',
    "Each section would gain from one concrete example.",
    "A closing sentence that ties the sections together would round it off.",
    "The sections are in a sensible order for a first-time reader.",
)
# Openers for the kinds of question a plan asks (by how the question begins).
_OPENERS = (
    ("what is ", "The subject of {T} is easiest to grasp by starting with what it is."),
    ("what are the", "Several approaches to {T} are in use today, each with its own strengths."),
    ("what evidence", "The evidence on {T} comes from direct measurements and long-term records."),
    ("what risks", "The subject of {T} has real limits, and some of its problems are still open."),
    ("how does", "The subject of {T} is central to the goal: it is what the report explains."),
)
_IMPERATIVES = ("explain ", "describe ", "summarize ", "summarise ", "discuss ", "tell me about ")


def _fields(prompt: str) -> dict[str, str]:
    """`Key: value` lines of a prompt, keys lower-cased."""
    found: dict[str, str] = {}
    for line in prompt.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and " " not in key.strip() and value.strip():
            found.setdefault(key.strip().lower(), value.strip())
    return found


def _subject(fields: dict[str, str], prompt: str) -> str:
    """The noun phrase the prompt is about."""
    text = fields.get("topic") or fields.get("title") or prompt.strip().splitlines()[0]
    text = text.strip().rstrip(".!")
    lowered = text.lower()
    for verb in _IMPERATIVES:
        if lowered.startswith(verb):
            text = text[len(verb) :]
            break
    if text.endswith("?"):
        return f'the question "{text}"'
    return text


def _sentence(template: str, subject: str) -> str:
    text = template.format(T=subject)
    return text[0].upper() + text[1:]


class OfflineModel:
    """A deterministic stand-in for a model: no network, no key, no cost.

    It writes a few plain sentences about what the prompt names (its `Topic:` or `Title:`
    line, or the prompt itself), picked by a hash of the system and user prompt, so the same
    call always gives the same text. Token counts are
    estimated from text length (~4 characters per token), so cost reporting has numbers to
    work with. Asked for another `model`, it stands in for that one: the seed includes the
    name, and the completion (and so the usage) is reported under it.
    """

    model = OFFLINE_MODEL
    provider = "cairn.offline"  # `gen_ai.provider.name` on traced model calls

    async def complete(
        self, system: str, prompt: str, *, max_tokens: int = 512, model: str | None = None
    ) -> Completion:
        """Return deterministic sentences about what `prompt` names."""
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        name = model or self.model
        seed = system if name == self.model else f"{name}\x00{system}"
        text = offline_text(seed, prompt, max_tokens)
        return Completion(
            text=text,
            model=name,
            input_tokens=estimate_tokens(system) + estimate_tokens(prompt),
            output_tokens=estimate_tokens(text),
        )


def offline_text(system: str, prompt: str, max_tokens: int) -> str:
    """The offline model's answer: a few plain sentences about what the prompt names. Given a
    finding to write up, it keeps the finding and adds to it; given a report's title, it
    answers as an editor would."""
    digest = hashlib.sha256(f"{system}\x00{prompt}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    fields = _fields(prompt)
    subject = _subject(fields, prompt) if prompt.strip() else "the subject"
    if "finding" in fields:
        sentences = [fields["finding"], *rng.sample(_ON_A_FINDING, 2)]
    elif "title" in fields and "topic" not in fields:
        sentences = [_sentence(_EDITOR[0], subject), _sentence(rng.choice(_EDITOR[1:]), subject)]
    else:
        question = fields.get("question", "").lower()
        opener = next((o for start, o in _OPENERS if question.startswith(start)), None)
        sentences = [
            _sentence(opener or rng.choice(_ABOUT), subject),
            *(_sentence(s, subject) for s in rng.sample(_BESIDES, rng.randint(1, 2))),
        ]
    budget = max_tokens * CHARS_PER_TOKEN
    kept: list[str] = []
    used = 0
    for sentence in sentences:
        if used + len(sentence) + 1 > budget and kept:
            break
        kept.append(sentence)
        used += len(sentence) + 1
    text = " ".join(kept)
    if len(text) > budget:  # a budget smaller than one sentence: cut at a word boundary
        text = text[:budget].rsplit(" ", 1)[0] or text[:budget]
    return text


class OpenAICompatibleClient:
    """A client for `POST {base_url}/chat/completions`.

    Retries timeouts, connection errors, 429 and 5xx answers (`max_retries` times, with
    backoff, honouring a short `Retry-After`); other 4xx answers raise `LLMPermanentError`,
    which the worker reports as non-retryable. A request is a pure function of its inputs,
    so retrying it is safe. Close the client with `aclose()` (or `async with`).
    """

    provider = "openai"  # the protocol spoken: `gen_ai.provider.name` on traced model calls

    def __init__(
        self,
        *,
        api_key: str | None,
        model: str = DEFAULT_OPENAI_MODEL,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = 60.0,
        max_retries: int = 2,
        token_limit_param: str = "max_tokens",  # noqa: S107 (a parameter name, not a secret)
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.timeout = timeout
        self.max_retries = max_retries
        # Newer OpenAI models want `max_completion_tokens`; most compatible servers `max_tokens`.
        self.token_limit_param = token_limit_param
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(headers=headers, timeout=timeout, transport=transport)

    async def complete(
        self, system: str, prompt: str, *, max_tokens: int = 512, model: str | None = None
    ) -> Completion:
        """Ask the model (`model`, or the client's own); raise `LLMError` (retryable) or
        `LLMPermanentError` with a clear message when it cannot answer."""
        name = model or self.model
        body: dict[str, Any] = {
            "model": name,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": prompt},
            ],
            self.token_limit_param: max_tokens,
        }
        attempt = 0
        while True:
            try:
                response = await self._http.post(self.url, json=body)
            except httpx.TimeoutException:
                error: LLMError = LLMError(
                    f"LLM request to {self.url} timed out after {self.timeout:g}s "
                    f"(model {name}); raise CAIRN_LLM_TIMEOUT or check the server"
                )
                delay = None
            except httpx.TransportError as exc:
                error = LLMError(f"cannot reach the LLM at {self.url}: {exc or type(exc).__name__}")
                delay = None
            else:
                if response.status_code < 400:
                    return self._parse(response, system, prompt, name)
                error = self._http_error(response, name)
                if isinstance(error, LLMPermanentError):
                    raise error
                delay = _retry_after(response)
            if attempt >= self.max_retries:
                raise error
            attempt += 1
            await asyncio.sleep(delay if delay is not None else 0.5 * 2 ** (attempt - 1))

    def _http_error(self, response: httpx.Response, model: str) -> LLMError:
        detail = _error_detail(response)
        message = (
            f"LLM at {self.url} answered HTTP {response.status_code} "
            f"{response.reason_phrase}: {detail}"
        )
        status = response.status_code
        if status in (401, 403):
            return LLMPermanentError(f"{message} (check CAIRN_LLM_API_KEY)")
        if status == 404:
            where = "CAIRN_LLM_MODEL" if model == self.model else f"the step's model {model!r}"
            return LLMPermanentError(f"{message} (check CAIRN_LLM_BASE_URL and {where})")
        if status in (408, 409, 425, 429) or status >= 500:
            return LLMError(message)
        return LLMPermanentError(message)

    def _parse(self, response: httpx.Response, system: str, prompt: str, model: str) -> Completion:
        try:
            data = response.json()
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise LLMError(
                f"LLM at {self.url} returned something other than a chat completion: "
                f"{response.text[:200]!r}"
            ) from None
        if not isinstance(content, str):
            raise LLMError(f"LLM at {self.url} returned no text content (model {model})")
        usage = data.get("usage") or {}
        prompt_tokens = usage.get("prompt_tokens")
        completion_tokens = usage.get("completion_tokens")
        return Completion(
            text=content,
            # The name asked for, not the server's dated snapshot ("gpt-4o-mini-2024-07-18"):
            # it is what price tables and budgets are keyed on.
            model=model,
            # Some compatible servers omit usage; an estimate keeps cost tracking honest.
            input_tokens=prompt_tokens
            if isinstance(prompt_tokens, int)
            else estimate_tokens(system) + estimate_tokens(prompt),
            output_tokens=completion_tokens
            if isinstance(completion_tokens, int)
            else estimate_tokens(content),
        )

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._http.aclose()

    async def __aenter__(self) -> OpenAICompatibleClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _error_detail(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:200].strip() or "(empty body)"
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])[:300]
    if isinstance(error, str):
        return error[:300]
    return response.text[:200].strip()


def _retry_after(response: httpx.Response) -> float | None:
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    # A long Retry-After is better spent by the coordinator's retry policy than by a worker.
    return min(max(seconds, 0.0), 10.0)


def llm_provider(client: LLMClient) -> str | None:
    """Who serves the client's models (its `provider`, e.g. "openai"), for traces; None when
    the client does not say."""
    provider = getattr(client, "provider", None)
    return provider if isinstance(provider, str) and provider else None


def llm_from_settings(settings: Settings) -> LLMClient:
    """The LLM client the settings ask for (`Settings.llm` and the `llm_*` fields:
    `CAIRN_LLM`, `CAIRN_LLM_BASE_URL`, `CAIRN_LLM_API_KEY`, `CAIRN_LLM_MODEL`,
    `CAIRN_LLM_TIMEOUT`). Raises LLMConfigError when `openai` has no API key."""
    if settings.llm == "offline":
        return OfflineModel()
    if settings.llm_api_key is None:
        raise LLMConfigError(
            "CAIRN_LLM=openai needs an API key: set CAIRN_LLM_API_KEY "
            "(or set CAIRN_LLM=offline to run without a model)"
        )
    return OpenAICompatibleClient(
        api_key=settings.llm_api_key,
        model=settings.llm_model,
        base_url=settings.llm_base_url,
        timeout=settings.llm_timeout,
    )


def llm_from_env(environ: Mapping[str, str] | None = None) -> LLMClient:
    """The LLM client the environment asks for (`environ`, default this process's), as
    `Settings.from_env` reads it:

    - `CAIRN_LLM`: `offline` (default) or `openai` (any chat-completions server).
    - `CAIRN_LLM_BASE_URL`: default https://api.openai.com/v1.
    - `CAIRN_LLM_API_KEY`: required for `openai`.
    - `CAIRN_LLM_MODEL`: default gpt-4o-mini.
    - `CAIRN_LLM_TIMEOUT`: seconds per request, default 60.
    """
    try:
        settings = Settings.from_env(environ=environ)
    except SettingsError as exc:
        raise LLMConfigError(str(exc)) from None
    return llm_from_settings(settings)
