"""A misbehaving backend on a real loopback socket, for the unit tests of the gateway's backend clients
and engine (``test_backends.py``, ``test_engine.py``): each connection answers as a test scripts it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from services.gateway.config import Settings


def _http_response(status: int, body: dict[str, Any], extra_headers: str = "") -> bytes:
    data = json.dumps(body).encode()
    head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
    return (head + extra_headers + "\r\n").encode() + data


OK_BODY = {"model": {"name": "m", "version": 1, "alias": "production", "backend": "torch"}, "results": []}
TAGS_ANSWER = {
    **OK_BODY,
    "results": [{"index": 0, "tags": [{"name": "cat", "score": 0.9, "hashtag": "#cat"}]}],
}


@asynccontextmanager
async def loopback_server(
    behaviours: list[str | dict[str, Any]], targets: list[str] | None = None
) -> AsyncIterator[tuple[str, list[str | dict[str, Any]]]]:
    """A real TCP server on loopback; connection ``i`` behaves as ``behaviours[i]`` (the last repeats):

    ``close`` reads the request and hangs up without answering; ``ok`` answers 200 JSON; ``hang`` never
    answers; ``500`` answers ``internal_error``; ``503`` answers ``overloaded`` with Retry-After 3;
    ``415`` answers ``unsupported_format``; ``tags-only`` answers as the detector's ``/v1/analyze`` with
    its ``tags`` object alone; a dict is answered as it is, 200 JSON (a scripted model answer).
    Yields the base URL and the log of behaviours used, one per connection; ``targets``, when given,
    receives each request's target (path and query).
    """
    used: list[str | dict[str, Any]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        behaviour = behaviours[min(len(used), len(behaviours) - 1)]
        used.append(behaviour)
        head = await reader.readuntil(b"\r\n\r\n")
        if targets is not None:
            targets.append(head.split(b" ", 2)[1].decode())
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            ),
            0,
        )
        await reader.readexactly(length)
        if isinstance(behaviour, dict):
            writer.write(_http_response(200, behaviour))
        elif behaviour == "ok":
            writer.write(_http_response(200, OK_BODY))
        elif behaviour == "tags-only":
            writer.write(_http_response(200, {"tags": TAGS_ANSWER}))
        elif behaviour == "hang":
            await asyncio.sleep(30)
        elif behaviour == "500":
            writer.write(_http_response(500, {"error": {"code": "internal_error", "message": "broken"}}))
        elif behaviour == "503":
            busy = {"error": {"code": "overloaded", "message": "busy"}}
            writer.write(_http_response(503, busy, "retry-after: 3\r\n"))
        elif behaviour == "415":
            writer.write(
                _http_response(415, {"error": {"code": "unsupported_format", "message": "not an image"}})
            )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", used
    finally:
        server.close()


def unit_settings(**overrides: Any) -> Settings:
    # Generous timeouts: a loopback answer can take a second when other processes load the cores, and
    # only the tests of timeouts (against a server that never answers) should ever see one fire.
    values: dict[str, Any] = {
        "backend_timeout_s": 10.0,
        "connect_timeout_s": 10.0,
        "retry_jitter_s": 0.01,
        "breaker_failure_threshold": 2,
        "breaker_cooldown_s": 60,
        "database_url": "sqlite://",
        **overrides,
    }
    return Settings(**values)
