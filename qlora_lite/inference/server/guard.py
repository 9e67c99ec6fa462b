"""The door: the API key (compared in constant time) and the body size limit, before any route runs.

A plain ASGI middleware rather than a FastAPI dependency, so that a request without the key is refused
before its body is read or validated, and an over-large body is refused without buffering all of it.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from qlora_lite.inference.server.errors import APIError

OPEN_PATHS = ("/health",)  # what a load balancer may ask without the key (as vLLM's /health)
DRAIN_LIMIT = 64  # times the body limit: how much of an over-large body is read (and dropped) before 413


class Guard:
    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", ())}
        if self.key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            await _send(send, APIError(
                401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            ))  # fmt: skip
            return
        declared = headers.get("content-length")
        if declared is not None and not declared.isdigit():
            await _send(send, APIError(400, "the Content-Length header is not a number"))
            return
        # Read the body here (keeping at most the limit), then hand it on; later messages (the disconnect)
        # pass through. An over-large body is read to its end and dropped, so that the client, still
        # sending, receives the 413 instead of a broken connection.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([], message, receive), send)
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size <= self.max_body_bytes:
                chunks.append(message.get("body", b""))
            elif size > DRAIN_LIMIT * self.max_body_bytes:
                break  # not worth reading on: answer now, the connection closes
        if size > self.max_body_bytes:
            await _send(send, self._too_large())
            return
        await self.app(scope, _replay(chunks, None, receive), send)

    def _authorized(self, headers: dict[str, bytes]) -> bool:
        scheme, _, token = headers.get("authorization", b"").partition(b" ")
        # compare_digest on every request, right key or wrong: the time taken says nothing about the key.
        return hmac.compare_digest(token.strip(), self.key) and scheme.lower() == b"bearer"

    def _too_large(self) -> APIError:
        return APIError(
            413, f"the request body is over this server's limit of {self.max_body_bytes} bytes: "
            "send a shorter prompt (or start the server with a larger --max-body-bytes)", code="body_too_large",
        )  # fmt: skip


def _replay(chunks: list[bytes], pending: dict | None, receive: Any) -> Any:
    body = b"".join(chunks)
    state = {"sent": False}

    async def replay() -> dict:
        if not state["sent"]:
            state["sent"] = True
            if pending is not None:
                return pending
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send(send: Any, error: APIError) -> None:
    payload = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
