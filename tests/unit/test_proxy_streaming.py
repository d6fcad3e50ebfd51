"""SSEResponse ends a call exactly once however the stream ends, and knows whether the client got it all."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.proxy.streaming import SSEResponse

SCOPE = {"type": "http", "asgi": {"spec_version": "2.3"}}


async def chunks(n: int, delay: float = 0.0) -> AsyncIterator[bytes]:
    for i in range(n):
        if delay:
            await asyncio.sleep(delay)
        yield f"data: {i}\n\n".encode()


def recorder() -> tuple[list[bool], object]:
    calls: list[bool] = []
    return calls, calls.append


async def never_disconnects() -> dict:
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


async def test_completed_stream_finishes_once_with_client_present():
    calls, on_finish = recorder()
    sent: list[dict] = []

    async def send(msg: dict) -> None:
        sent.append(msg)

    await SSEResponse(chunks(3), on_finish)(SCOPE, never_disconnects, send)
    assert calls == [False]
    assert sent[0]["type"] == "http.response.start" and sent[-1] == {"type": "http.response.body", "body": b"",
                                                                     "more_body": False}  # fmt: skip
    assert [m["body"] for m in sent[1:-1]] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]


async def test_disconnect_mid_stream_finishes_once_as_client_gone_and_closes_the_source():
    calls, on_finish = recorder()
    gone = asyncio.Event()
    closed: list[bool] = []
    sent = 0

    async def send(msg: dict) -> None:
        nonlocal sent
        sent += 1
        if sent == 3:
            gone.set()

    async def receive() -> dict:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def on_close() -> None:
        closed.append(True)

    await SSEResponse(chunks(1000, delay=0.001), on_finish, on_close)(SCOPE, receive, send)
    assert calls == [True] and closed == [True] and sent < 20


async def test_client_gone_before_the_first_byte_sends_nothing():
    calls, on_finish = recorder()
    sent: list[dict] = []

    async def send(msg: dict) -> None:
        sent.append(msg)

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    await SSEResponse(chunks(5), on_finish)(SCOPE, receive, send)
    assert calls == [True] and sent == []


async def test_socket_error_on_send_counts_as_client_gone():
    calls, on_finish = recorder()

    async def send(msg: dict) -> None:
        if msg["type"] == "http.response.body":
            raise OSError("broken pipe")

    await SSEResponse(chunks(5), on_finish)(SCOPE, never_disconnects, send)
    assert calls == [True]


async def test_cancelled_response_task_still_finishes_once():
    calls, on_finish = recorder()

    async def send(msg: dict) -> None:
        pass

    task = asyncio.ensure_future(SSEResponse(chunks(1000, delay=0.01), on_finish)(SCOPE, never_disconnects, send))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == [True]


async def test_a_bug_in_the_source_still_finishes_once_and_surfaces():
    calls, on_finish = recorder()

    async def broken() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        raise RuntimeError("bug")

    async def send(msg: dict) -> None:
        pass

    with pytest.raises(RuntimeError):
        await SSEResponse(broken(), on_finish)(SCOPE, never_disconnects, send)
    assert calls == [True]
