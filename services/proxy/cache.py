"""Exact-match response cache: canonical request keys, an LRU bounded by entries, bytes and TTL, and the
conversions that let a streamed answer be cached and a cached answer be replayed as a stream."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

from schemas.events import UsageSource
from services.proxy.tokens import TokenUsage

# Fields that change who asked or how the answer travels, never what the answer is. `mock` stays in the
# key on purpose: it is part of the request the upstream answers, like any other provider parameter.
VOLATILE_FIELDS = frozenset({"user", "stream", "stream_options", "metadata", "store", "service_tier"})

HEADER = "x-tollway-cache"
_ON = frozenset({"true", "1", "yes", "on", "force"})
_NO_READ = frozenset({"no-cache", "refresh"})
_OFF = frozenset({"false", "0", "no", "off", "no-store"})


@dataclass(frozen=True, slots=True)
class CacheUse:
    read: bool
    write: bool


NEVER = CacheUse(False, False)


def cache_use(header: str | None, body: dict[str, Any], kind: str) -> CacheUse:
    """Deterministic requests (chat at temperature 0) are cached by default; anything else only when the
    caller opts in with `X-Tollway-Cache: true`. `no-cache` skips the lookup but refreshes the entry;
    `no-store` (or `false`) keeps the cache out of it entirely."""
    h = header.strip().lower() if header else ""
    if h in _OFF:
        return NEVER
    if h in _ON:
        return CacheUse(True, True)
    t = body.get("temperature")
    deterministic = kind == "chat" and isinstance(t, (int, float)) and not isinstance(t, bool) and t == 0
    if h in _NO_READ:
        return CacheUse(False, deterministic)
    return CacheUse(deterministic, deterministic)


def _canon(v: Any) -> Any:
    # 0 and 0.0 ask for the same thing; JSON spells them differently
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, dict):
        return {k: _canon(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_canon(x) for x in v]
    return v


def cache_key(team_id: str, model: str, endpoint: str, body: dict[str, Any]) -> bytes:
    """Team-scoped (one team never sees another's answers), by public model name so aliases share entries."""
    request = {k: _canon(v) for k, v in body.items() if k not in VOLATILE_FIELDS and k != "model"}
    raw = orjson.dumps([team_id, model, endpoint, request], option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(raw, digest_size=20).digest()


@dataclass(slots=True)
class Entry:
    body: bytes  # the non-streamed JSON answer
    usage: TokenUsage  # what the answer cost when it was made: a hit records it (the avoided cost, in ROI)
    usage_source: UsageSource
    provider: str
    expires_at: float


class ResponseCache:
    def __init__(self, max_entries: int, max_bytes: int, max_entry_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float | None = None) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= (time.monotonic() if now is None else now):
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: Entry) -> bool:
        size = len(entry.body)
        if size > self.max_entry_bytes:
            return False
        if key in self._entries:
            self._drop(key)
        self._entries[key] = entry
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        return True

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        self.bytes -= len(entry.body)


class CompletionAssembler:
    """Folds chat.completion.chunk objects back into the chat.completion they stream."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: Any = None
        self.cacheable = True

    def add(self, chunk: dict[str, Any]) -> None:
        if not self.head:
            self.head = {k: chunk.get(k) for k in ("id", "created", "model", "system_fingerprint") if k in chunk}
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for c in chunk.get("choices") or ():
            if not isinstance(c, dict) or not isinstance(c.get("index", 0), int):
                self.cacheable = False
                continue
            acc = self.choices.setdefault(c.get("index", 0), {"role": "assistant", "content": [], "tools": {}})
            delta = c.get("delta") or {}
            if not isinstance(delta, dict):
                self.cacheable = False
                continue
            if isinstance(delta.get("role"), str):
                acc["role"] = delta["role"]
            if isinstance(delta.get("content"), str):
                acc["content"].append(delta["content"])
            if delta.get("refusal"):
                acc["refusal"] = acc.get("refusal", "") + str(delta["refusal"])
            for tc in delta.get("tool_calls") or ():
                self._tool(acc["tools"], tc)
            if delta.get("function_call") is not None:
                self.cacheable = False  # legacy streaming shape: rare, not worth reassembling
            if c.get("finish_reason"):
                acc["finish_reason"] = c["finish_reason"]

    def _tool(self, tools: dict[int, dict[str, Any]], tc: Any) -> None:
        if not isinstance(tc, dict) or not isinstance(tc.get("index", 0), int):
            self.cacheable = False
            return
        t = tools.setdefault(tc.get("index", 0), {"id": None, "type": "function", "name": "", "arguments": []})
        t["id"] = tc.get("id") or t["id"]
        fn = tc.get("function") or {}
        if isinstance(fn, dict):
            t["name"] += fn.get("name") or ""
            if isinstance(fn.get("arguments"), str):
                t["arguments"].append(fn["arguments"])

    def completion(self) -> dict[str, Any] | None:
        if not self.cacheable or not self.choices or any("finish_reason" not in c for c in self.choices.values()):
            return None  # an unfinished stream is not an answer worth replaying
        choices = []
        for i in sorted(self.choices):
            acc = self.choices[i]
            message: dict[str, Any] = {"role": acc["role"], "content": "".join(acc["content"]) or None}
            if acc.get("refusal"):
                message["refusal"] = acc["refusal"]
            if acc["tools"]:
                message["tool_calls"] = [
                    {"id": t["id"], "type": t["type"], "function": {"name": t["name"], "arguments": "".join(t["arguments"])}}
                    for _, t in sorted(acc["tools"].items())
                ]  # fmt: skip
            choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": acc["finish_reason"]})
        out: dict[str, Any] = {"id": self.head.get("id"), "object": "chat.completion",
                               "created": self.head.get("created"), "model": self.head.get("model"),
                               "choices": choices}  # fmt: skip
        if self.head.get("system_fingerprint"):
            out["system_fingerprint"] = self.head["system_fingerprint"]
        if self.usage is not None:
            out["usage"] = self.usage
        return out


def replay_chunks(completion: dict[str, Any], include_usage: bool) -> list[bytes]:
    """A cached chat.completion as the SSE events a live stream would have sent (one content delta per choice)."""
    head = {"id": completion.get("id"), "object": "chat.completion.chunk", "created": completion.get("created"),
            "model": completion.get("model")}  # fmt: skip
    if completion.get("system_fingerprint"):
        head["system_fingerprint"] = completion["system_fingerprint"]
    events: list[bytes] = []

    def emit(choices: list[dict[str, Any]], usage: Any = None, with_usage_field: bool = include_usage) -> None:
        chunk = {**head, "choices": choices}
        if with_usage_field:
            chunk["usage"] = usage
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")

    for choice in completion.get("choices") or ():
        i = choice.get("index", 0)
        msg = choice.get("message") or {}
        emit([{"index": i, "delta": {"role": msg.get("role", "assistant"), "content": ""}, "logprobs": None,
               "finish_reason": None}])  # fmt: skip
        delta: dict[str, Any] = {}
        if msg.get("content"):
            delta["content"] = msg["content"]
        if msg.get("refusal"):
            delta["refusal"] = msg["refusal"]
        if msg.get("tool_calls"):
            delta["tool_calls"] = [{"index": j, **tc} for j, tc in enumerate(msg["tool_calls"])]
        if delta:
            emit([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
        emit([{"index": i, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason") or "stop"}])
    if include_usage and completion.get("usage") is not None:
        emit([], completion["usage"])
    events.append(b"data: [DONE]\n\n")
    return events
