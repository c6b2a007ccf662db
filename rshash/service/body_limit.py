"""Request bodies refused at their size limit while they stream in, before anything is spooled.

Starlette parses a multipart upload into a temporary file before the endpoint sees it, so a
limit checked in the endpoint comes after the whole body has been read and written to disk. This
ASGI middleware checks the declared `Content-Length` first (refused before a byte is read) and
counts the bytes of every body as they arrive (chunked uploads declare none), answering 413 as
soon as the limit is passed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import HTTPException

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]


class BodyTooLarge(HTTPException):
    """Raised from inside body parsing; an HTTPException, so FastAPI answers it as such."""

    def __init__(self, limit: int) -> None:
        # Connection: close makes the server hang up instead of reading (and discarding) the
        # rest of the body.
        message = f"request body larger than {limit} bytes"
        super().__init__(413, message, headers={"Connection": "close"})


class BodyLimit:
    """Per-path body limits in bytes (`default` for every other path)."""

    def __init__(self, app: Any, limits: Mapping[str, int], default: int) -> None:
        self.app = app
        self.limits = dict(limits)
        self.default = default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, limit)
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message: Message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge:
            if not started:
                await _refuse(send, limit)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps({"error": f"request body larger than {limit} bytes"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
