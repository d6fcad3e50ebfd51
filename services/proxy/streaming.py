"""SSE pass-through for chat completions: relay chunks as they come, read usage from the final chunk.

The upstream is always asked for usage (`stream_options.include_usage`); its usage-only chunk is
forwarded only when the client asked for it. The call ends exactly once when the stream ends, however
it ends (completed, upstream broke, client went away, server shutting down).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from services.proxy.cache import CompletionAssembler
from services.proxy.cost import usage_with_cost
from services.proxy.errors import GatewayError, UpstreamError, UpstreamUnavailable, error_body
from services.proxy.tokens import TokenUsage, usage_of
from services.proxy.upstream import TRANSPORT_ERRORS


@dataclass(slots=True)
class StreamOutcome:
    usage: TokenUsage | None = None  # the provider's count, from the stream's usage chunk; None if it sent none
    completed: bool = False
    upstream_broken: bool = False
    finished: bool = False  # a choice reported its finish_reason
    client_gone: bool = False
    ttft_ms: float | None = None
    content_chars: int = 0
    too_large: bool = False  # broken because a line or the whole stream passed its bound


def _sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


DONE = b"data: [DONE]\n\n"


class StreamTooLarge(Exception):
    """An SSE line, or the whole stream, past its bound: the provider is broken or hostile."""


MAX_LINE = 1024 * 1024
MAX_STREAM = 128 * 1024 * 1024


class StreamRelay:
    """One upstream SSE stream relayed to one client; `finish` runs exactly once however it ends."""

    def __init__(self, resp: aiohttp.ClientResponse, started: float, client_wants_usage: bool,
                 on_end: Callable[[StreamOutcome], None], assembler: CompletionAssembler | None = None,
                 max_line: int = MAX_LINE, max_stream: int = MAX_STREAM,
                 quote_usage: Callable[[TokenUsage], str] | None = None) -> None:  # fmt: skip
        self.resp = resp
        self.started = started
        self.client_wants_usage = client_wants_usage
        self.on_end = on_end
        self.assembler = assembler
        # the client asked for usage: its usage chunk carries usage.cost, this call's exact amount ('' unpriced)
        self.quote_usage = quote_usage
        self.out = StreamOutcome()
        self._lines = _lines(resp.content, max_line, max_stream)
        self._first: bytes | None = None
        self._finished = False

    async def prime(self) -> None:
        """Read up to the first event before the client sees a byte: until then the call can still be
        retried elsewhere. An upstream that breaks or ends here is a failed attempt, not a broken stream."""
        try:
            async for line in self._lines:
                if line.startswith(b"data:"):
                    self._first = line[5:].strip()
                    return
        except StreamTooLarge as err:
            self.resp.close()
            raise UpstreamError(f"upstream stream too large: {err}", code="upstream_response_too_large") from err
        except TRANSPORT_ERRORS as err:
            self.resp.close()
            failure: GatewayError = UpstreamUnavailable(
                f"upstream stream failed before its first event: {type(err).__name__}"
            )
            failure.retryable = True
            raise failure from err
        self.resp.close()
        failure = UpstreamError("upstream stream ended before its first event")
        failure.retryable = True
        raise failure

    async def _payloads(self) -> AsyncIterator[bytes]:
        if self._first is not None:
            yield self._first
        async for line in self._lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()

    async def events(self) -> AsyncIterator[bytes]:
        """The chunks, as they come. The last one goes out only after the call is recorded (`finish`): a
        client holding a whole answer while the process dies before its event is in the spool would be a call
        answered and never billed (tests/e2e/test_pipeline_kill9.py)."""
        out = self.out
        try:
            async for payload in self._payloads():
                if payload == b"[DONE]":
                    out.completed = True
                    self.finish(False)
                    yield DONE
                    return
                try:
                    chunk = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    continue  # a provider keep-alive or garbage line: nothing the client can use
                if not isinstance(chunk, dict):
                    continue
                if self.assembler is not None:
                    self.assembler.add(chunk)
                usage = chunk.get("usage")
                choices = chunk.get("choices")
                if isinstance(usage, dict):
                    out.usage = usage_of(usage)
                    if not choices and not self.client_wants_usage:
                        continue  # we asked for usage on the client's behalf: it does not expect this chunk
                    if self.quote_usage is not None and (usd := self.quote_usage(out.usage)):
                        payload = usage_with_cost(chunk, usage, usd)
                if choices and isinstance(choices, list):
                    first = choices[0] if isinstance(choices[0], dict) else {}
                    delta = first.get("delta") or {}
                    content = delta.get("content") if isinstance(delta, dict) else None
                    if content and isinstance(content, str):
                        if out.ttft_ms is None:
                            out.ttft_ms = (time.perf_counter() - self.started) * 1000
                        out.content_chars += len(content)
                    elif isinstance(delta, dict) and delta.get("tool_calls"):
                        out.content_chars += len(orjson.dumps(delta["tool_calls"]))
                    if first.get("finish_reason"):
                        out.finished = True
                yield _sse(payload)
            if out.finished:  # some providers end without [DONE]; the SDKs read it as the end either way
                out.completed = True
                last = DONE
            else:
                out.upstream_broken = True
                last = _sse(error_body("The upstream provider ended the stream early.", "api_error",
                                       "upstream_stream_broken"))  # fmt: skip
        except TRANSPORT_ERRORS:
            out.upstream_broken = True
            last = _sse(error_body("The upstream provider's stream broke.", "api_error", "upstream_stream_broken"))
        except StreamTooLarge:
            out.upstream_broken = out.too_large = True
            last = _sse(error_body("The upstream provider's stream exceeded the gateway's bounds.", "api_error",
                                   "upstream_response_too_large"))  # fmt: skip
        self.finish(False)
        yield last

    def finish(self, client_gone: bool) -> None:
        if self._finished:
            return
        self._finished = True
        self.out.client_gone = client_gone and not self.out.completed
        self.on_end(self.out)

    async def aclose(self) -> None:
        # close, not release: a stream cut short must drop the connection so the provider stops generating
        self.resp.close()


async def _lines(content: aiohttp.StreamReader, max_line: int, max_stream: int) -> AsyncIterator[bytes]:
    """The body line by line (no terminator), as chunks arrive (decompressed by aiohttp); a line longer than
    `max_line` or a stream past `max_stream` bytes raises StreamTooLarge instead of growing without end."""
    rest = b""
    total = 0
    async for chunk in content.iter_any():
        total += len(chunk)
        if total > max_stream:
            raise StreamTooLarge(f"stream longer than {max_stream} bytes")
        if rest:
            chunk = rest + chunk
        *lines, rest = chunk.split(b"\n")
        for line in lines:
            if len(line) > max_line:
                raise StreamTooLarge(f"SSE line longer than {max_line} bytes")
            yield line[:-1] if line.endswith(b"\r") else line
        if len(rest) > max_line:
            raise StreamTooLarge(f"SSE line longer than {max_line} bytes")
    if rest:
        yield rest


async def line_batches(content: aiohttp.StreamReader, max_line: int, max_stream: int) -> AsyncIterator[list[bytes]]:
    """`_lines`, one list per network chunk: the lines that arrived together, so a relay can send the events
    already here in one write instead of one each (same bounds, same StreamTooLarge)."""
    rest = b""
    total = 0
    async for chunk in content.iter_any():
        total += len(chunk)
        if total > max_stream:
            raise StreamTooLarge(f"stream longer than {max_stream} bytes")
        if rest:
            chunk = rest + chunk
        *lines, rest = chunk.split(b"\n")
        for i, line in enumerate(lines):
            if len(line) > max_line:
                raise StreamTooLarge(f"SSE line longer than {max_line} bytes")
            if line.endswith(b"\r"):
                lines[i] = line[:-1]
        if len(rest) > max_line:
            raise StreamTooLarge(f"SSE line longer than {max_line} bytes")
        if lines:
            yield lines
    if rest:
        yield [rest]


class SSEResponse(Response):
    """Sends an SSE stream while watching for the client to leave.

    Starlette's StreamingResponse cancels its body iterator on disconnect, and a generator cancelled while
    suspended at `yield` never runs its `finally`: the usage event would be lost. Here the end of the call
    (`on_finish`, synchronous, so even a cancelled task runs it) and the upstream close sit in this
    response's own `finally`, and whether the client left is known for certain.
    """

    media_type = "text/event-stream"

    def __init__(self, source: AsyncIterator[bytes], on_finish: Callable[[bool], None],
                 on_close: Callable[[], Awaitable[None]] | None = None, headers: dict[str, str] | None = None) -> None:  # fmt: skip
        self.source = source
        self.on_finish = on_finish
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})

    async def _pump(self, send: Send, watch: asyncio.Future[None]) -> None:
        async for data in self.source:
            # a send to a vanished client returns silently in uvicorn, and a fully buffered upstream never
            # yields to the loop: look at the watcher between chunks, not only when asyncio gets to it
            if watch.done():
                raise _ClientGone
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _watch(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client_gone = True  # until the last byte is handed over, an exit means the client did not get it all
        watch = asyncio.ensure_future(self._watch(receive))
        pump: asyncio.Future[None] | None = None
        try:
            await asyncio.sleep(0)  # one step for the watcher: a client gone during the upstream wait shows now
            if watch.done():
                return
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            pump = asyncio.ensure_future(self._pump(send, watch))
            await asyncio.wait((pump, watch), return_when=asyncio.FIRST_COMPLETED)
            if pump.done() and not pump.cancelled():
                err = pump.exception()
                if err is None:
                    client_gone = False
                elif not isinstance(err, (OSError, _ClientGone)):  # OSError = the socket went away mid-send
                    raise err
        except OSError:
            pass
        finally:
            for task in (pump, watch):
                if task is not None:
                    task.cancel()
            self.on_finish(client_gone)  # before any await: a second cancellation cannot lose the event
            await asyncio.gather(*(t for t in (pump, watch) if t is not None), return_exceptions=True)
            await _close(self.source)
            if self.on_close is not None:
                await self.on_close()


class _ClientGone(Exception):
    pass


async def _close(source: AsyncIterator[bytes]) -> None:
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # already closed or broken: nothing left to release
            pass


async def iterate(events: list[bytes]) -> AsyncIterator[bytes]:
    for e in events:
        yield e
