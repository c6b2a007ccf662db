"""Limits that keep one request from costing the others: body size, background threads.

JSON bodies (every body but a multipart upload, which has its own limit) over `max_bytes` are
answered 413 with the service's JSON error as soon as the declared length or the bytes read
pass the bound, so a huge body costs neither memory nor parsing time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rshash.service.batcher import QueueFull

T = TypeVar("T")


class BodyLimit:
    """ASGI middleware: 413 for a non-multipart request body over `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or ()) if scope["type"] == "http" else {}
        if scope["type"] != "http" or headers.get(b"content-type", b"").startswith(b"multipart/"):
            await self.app(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = bool(message.get("more_body", False))
            if len(body) > self.max_bytes:
                await self._refuse(send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        data = json.dumps({"error": f"request body: larger than {self.max_bytes} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})


class BackgroundThreads:
    """Worker threads for work that must not delay the batches (resolving filters): `threads`
    of them at a lower CPU priority (Linux: each thread's own nice value, +`nice`), and at most
    `max_waiting` calls waiting for one (QueueFull beyond, which the service answers 503)."""

    def __init__(self, threads: int, max_waiting: int, nice: int = 10) -> None:
        self.max_waiting = max_waiting
        self.nice = nice
        self._pool = ThreadPoolExecutor(threads, "rshash-background", initializer=self._lower)
        self._calls = 0
        self._threads = threads

    def _lower(self) -> None:
        """+`nice` on this thread's own nice value (an absolute value would raise the priority
        of a service that runs niced)."""
        with contextlib.suppress(OSError, AttributeError):  # not Linux, or not allowed
            tid = threading.get_native_id()
            lower = min(os.getpriority(os.PRIO_PROCESS, tid) + self.nice, 19)
            os.setpriority(os.PRIO_PROCESS, tid, lower)

    @property
    def waiting(self) -> int:
        return max(self._calls - self._threads, 0)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.waiting >= self.max_waiting:
            raise QueueFull(f"{self.waiting} filters waiting")
        self._calls += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._calls -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
