"""What is checked before a request's body is read: who sends it, how large it is, and for the
login form where it comes from.

FastAPI reads and parses a body before it runs a route's dependencies, so a token checked
there comes after the server has taken in whatever was sent. This ASGI middleware answers
first: 401 for a request without a configured token (the login form, the health check and the
static files need none), 413 for a body over the limit (by its Content-Length, or counted as
it arrives when it has none), and 403 for a login posted from another site.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlsplit

from cairn.projections.http.auth import COOKIE_NAME, Tokens
from cairn.runtime.settings import DEFAULT_HTTP_MAX_BODY

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


class RequestGuard:
    """ASGI middleware: the token and the size of a request, before its body is read."""

    def __init__(self, app: ASGIApp, tokens: Tokens, max_body: int = DEFAULT_HTTP_MAX_BODY) -> None:
        self.app = app
        self.tokens = tokens
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path: str = scope["path"]
        public = path in ("/healthz", "/login", "/logout") or path.startswith("/static/")
        carries_body = scope["method"] not in _NO_BODY or "content-length" in headers
        # Without a body the app answers (pages send a browser to /login); with one, now.
        if carries_body and not public and not self._known(headers):
            await _reply(
                send,
                401,
                "no configured token: send `Authorization: Bearer TOKEN`, or log in at "
                "/login for the dashboard",
                {"www-authenticate": 'Bearer realm="cairn"'},
            )
            return
        if path == "/login" and scope["method"] == "POST" and not _same_site(headers):
            await _reply(send, 403, "the login form must be posted from this site")
            return
        if scope["method"] in _NO_BODY and "content-length" not in headers:
            await self.app(scope, receive, send)
            return
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await _reply(send, 400, "Content-Length must be a number of bytes")
                return
            if int(declared) > self.max_body:
                await _reply(send, 413, self._too_large(int(declared)))
                return
            await self.app(scope, receive, send)
            return
        # No length given (chunked): take the body in up to the limit, then hand it on.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _reply(send, 413, self._too_large(size, at_least=True))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        given = False

        async def replay() -> Message:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _known(self, headers: dict[str, str]) -> bool:
        token: str | None = None
        header = headers.get("authorization")
        if header is not None:
            scheme, _, value = header.partition(" ")
            token = value.strip() if scheme.lower() == "bearer" else None
        elif "cookie" in headers:
            jar = SimpleCookie()
            try:
                jar.load(headers["cookie"])
            except Exception:  # a malformed cookie header carries no token
                return False
            morsel = jar.get(COOKIE_NAME)
            token = morsel.value if morsel is not None else None
        return bool(token) and self.tokens.lookup(token or "") is not None

    def _too_large(self, size: int, *, at_least: bool = False) -> str:
        told = f"at least {size}" if at_least else str(size)
        return f"the request body of {told} bytes is over this server's {self.max_body}-byte limit"


def _same_site(headers: dict[str, str]) -> bool:
    """A login from this site: its Origin (or, without one, its Referer) names this host, and
    the browser does not call it cross-site. A client that sends neither (curl) is let through:
    it holds the token it types."""
    if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    source = headers.get("origin") or headers.get("referer")
    if source is None:
        return True
    if source == "null":
        return False
    return urlsplit(source).netloc.lower() == headers.get("host", "").lower()


async def _reply(
    send: Send, status: int, message: str, extra: dict[str, str] | None = None
) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
