"""The proxy's on-disk usage spool: every usage event is appended here before anything tries to send it.

Layout: `<dir>/<n:012d>.seg` append-only segments of records `[u32 length][u32 crc32][payload]`, plus
`cursor` (the first position the broker has not acknowledged yet, as two u64). The request path appends
one record with one `write()` (page cache: a kill -9 of the process loses nothing); the background sender
reads from the cursor, produces, and advances the cursor when the broker acknowledges.

fsync policy: segments and the cursor are fsynced by the sender at most every `spool_fsync_ms` (and on
segment roll and close) -- a machine crash can lose that window, a process crash loses nothing. A torn
tail record (machine crash mid-write) fails its CRC and ends the segment.

Acknowledged segments are kept `spool_retain_s` before deletion so that a fresh in-memory broker (the
bundled one, after a restart or a kill -9 of `tollway up`) can be refilled with recent events: ClickHouse
dedups by event_id, so a replay is always safe. The spool is bounded: acknowledged segments go first;
unsent events beyond `spool_max_bytes` are refused (counted, logged), with a loud warning well before.

Spool-full policy (`spool_full_policy`): by default (`refuse`) the proxy stops taking new calls once the unsent
backlog reaches `spool_refuse_ratio` of the bound (503 usage_unrecordable: a call that cannot be billed is not
made); the rest of the bound is room for the events of calls already in flight. Readiness fails earlier, at
`spool_degraded_ratio`, so a load balancer moves traffic away first. `serve_unbilled` keeps serving and
drops the events that no longer fit (counted): availability over billing, the operator's explicit choice.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import structlog
from prometheus_client import Counter, Gauge
from pydantic_settings import BaseSettings, SettingsConfigDict

log = structlog.get_logger("tollway.proxy.spool")

HEADER = struct.Struct(">II")
CURSOR = struct.Struct(">QQ")
Pos = tuple[int, int]  # (segment number, byte offset)

SPOOL_BYTES = Gauge("tollway_spool_bytes", "Bytes on disk in the usage spool (sent and unsent)")
SPOOL_PENDING_BYTES = Gauge("tollway_spool_pending_bytes", "Spooled bytes the broker has not acknowledged")
SPOOL_PENDING_EVENTS = Gauge("tollway_spool_depth", "Spooled usage events the broker has not acknowledged")
SPOOL_FILL = Gauge("tollway_spool_fill_ratio", "Unsent spool bytes / spool_max_bytes")
SPOOL_REFUSED = Counter("tollway_spool_refused_total", "Usage events refused because the spool was full")
SPOOL_REPLAYED = Counter("tollway_spool_replayed_total", "Spooled events re-sent (restart, broker loss)")


def fsync_all(fds: list[int]) -> None:
    """fsync and close each (duplicated) fd; safe to run off the event loop."""
    for fd in fds:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class SpoolSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLWAY_", frozen=True, extra="ignore")

    spool_max_bytes: int = 1024 * 1024 * 1024
    spool_segment_bytes: int = 16 * 1024 * 1024
    spool_fsync_ms: int = 200
    spool_retain_s: float = 900.0
    spool_warn_ratio: float = 0.8
    spool_degraded_ratio: float = 0.9
    spool_refuse_ratio: float = 0.95
    spool_full_policy: Literal["refuse", "serve_unbilled"] = "refuse"


class Spool:
    def __init__(self, directory: Path, settings: SpoolSettings | None = None) -> None:
        self.dir = directory
        self.s = settings or SpoolSettings()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._readers: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        for f in sorted(self.dir.glob("*.seg")):
            self._sizes[int(f.stem)] = f.stat().st_size
        self._cursor_fd = os.open(self.dir / "cursor", os.O_RDWR | os.O_CREAT, 0o644)
        raw = os.pread(self._cursor_fd, CURSOR.size, 0)
        self.acked: Pos = CURSOR.unpack(raw) if len(raw) == CURSOR.size else (min(self._sizes, default=0), 0)
        self.active = max(self._sizes, default=max(self.acked[0], 0))
        self._repair_tail(self.active)
        self._fd = os.open(self._path(self.active), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._sizes.setdefault(self.active, 0)
        self._opened_at = time.monotonic()
        self._dirty = False
        self._last_sync = time.monotonic()
        self._warned = False
        self.pending_events = sum(1 for _ in self.iter_from(self.acked))
        self.last_payload = self._last_payload()
        self._gauges()

    def _path(self, n: int) -> Path:
        return self.dir / f"{n:012d}.seg"

    # --- the request path -------------------------------------------------------------------------
    def append(self, payload: bytes) -> bool:
        """One write(); False (and counted) if the unsent backlog is at its bound."""
        size = HEADER.size + len(payload)
        if self.pending_bytes + size > self.s.spool_max_bytes:
            self._gc(force=True)
            if self.pending_bytes + size > self.s.spool_max_bytes:
                SPOOL_REFUSED.inc()
                return False
        os.write(self._fd, HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
        self._sizes[self.active] += size
        self.pending_events += 1
        self._dirty = True
        if self._sizes[self.active] >= self.s.spool_segment_bytes or (
            time.monotonic() - self._opened_at > self.s.spool_retain_s / 4 and self._sizes[self.active]
        ):
            self._roll()
        return True

    # --- the sender -------------------------------------------------------------------------------
    def read(self, pos: Pos, max_records: int) -> list[tuple[bytes, Pos]]:
        out: list[tuple[bytes, Pos]] = []
        for payload, nxt in self.iter_from(pos):
            out.append((payload, nxt))
            if len(out) >= max_records:
                break
        return out

    def iter_from(self, pos: Pos, chunk_bytes: int = 256 * 1024) -> Iterator[tuple[bytes, Pos]]:
        # One pread per chunk of records, not two per record: the sender reads every event once.
        seg, off = pos
        for n in sorted(k for k in self._sizes if k >= seg):
            off = off if n == seg else 0
            size = self._sizes[n]
            fd = self._reader(n)
            buf, base = b"", off  # buf holds the segment's bytes from `base` on
            while off + HEADER.size <= size:
                start = off - base
                if start + HEADER.size > len(buf):
                    buf, base, start = os.pread(fd, max(chunk_bytes, HEADER.size), off), off, 0
                    if len(buf) < HEADER.size:
                        break
                length, crc = HEADER.unpack_from(buf, start)
                end = start + HEADER.size + length
                if end > len(buf):  # the record runs past the chunk: read from its start, at least all of it
                    buf, base = os.pread(fd, max(chunk_bytes, HEADER.size + length), off), off
                    start, end = 0, HEADER.size + length
                payload = buf[start + HEADER.size : end]
                if len(payload) != length or zlib.crc32(payload) != crc:
                    log.error("spool_record_corrupt", segment=n, offset=off)
                    break
                off += HEADER.size + length
                yield payload, (n, off)

    def ack(self, pos: Pos, events: int) -> None:
        if pos <= self.acked:
            return  # a replay re-acknowledging what was acknowledged before
        self.acked = pos
        self.pending_events = max(0, self.pending_events - events)
        self._dirty = True

    def replay_start(self) -> Pos:
        """The oldest retained position: everything still on disk, sent or not."""
        return (min(self._sizes), 0)

    def sync(self, force: bool = False) -> None:
        """fsync segment + cursor if the policy's interval has passed; GC acknowledged segments."""
        fds = self.begin_sync(force)
        if fds is not None:
            fsync_all(fds)
            self.end_sync()

    def begin_sync(self, force: bool = False) -> list[int] | None:
        """Write the cursor and hand out duplicates of the fds to fsync, or None when no sync is due.

        Duplicates, so the fsync can run on a worker thread (it takes milliseconds) while the event loop
        keeps appending and may roll the segment and close the original fd.
        """
        if not force and (not self._dirty or (time.monotonic() - self._last_sync) * 1000 < self.s.spool_fsync_ms):
            return None
        os.pwrite(self._cursor_fd, CURSOR.pack(*self.acked), 0)
        self._dirty = False
        self._last_sync = time.monotonic()
        return [os.dup(self._fd), os.dup(self._cursor_fd)]

    def end_sync(self) -> None:
        self._gc()
        self._gauges()

    def close(self) -> None:
        self.sync(force=True)
        for fd in self._readers.values():
            os.close(fd)
        os.close(self._fd)
        os.close(self._cursor_fd)

    # --- accounting ---------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return sum(self._sizes.values())

    @property
    def pending_bytes(self) -> int:
        seg, off = self.acked
        return sum(size for n, size in self._sizes.items() if n >= seg) - off

    @property
    def fill_ratio(self) -> float:
        return self.pending_bytes / self.s.spool_max_bytes

    @property
    def degraded(self) -> bool:
        return self.fill_ratio >= self.s.spool_degraded_ratio

    @property
    def accepting(self) -> bool:
        """Whether a new call may start: its event will fit (see the spool-full policy above)."""
        return self.s.spool_full_policy == "serve_unbilled" or self.fill_ratio < self.s.spool_refuse_ratio

    def stats(self) -> dict[str, float | int]:
        return {"pending_events": self.pending_events, "pending_bytes": self.pending_bytes,
                "total_bytes": self.total_bytes, "fill_ratio": round(self.fill_ratio, 4)}  # fmt: skip

    # --- internals ----------------------------------------------------------------------------------
    def _reader(self, n: int) -> int:
        fd = self._readers.get(n)
        if fd is None:
            fd = self._readers[n] = os.open(self._path(n), os.O_RDONLY)
        return fd

    def _roll(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        self.active += 1
        self._fd = os.open(self._path(self.active), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._sizes[self.active] = 0
        self._opened_at = time.monotonic()

    def _repair_tail(self, n: int) -> None:
        """Cut a torn last record (a machine crash mid-append) so appends continue on a clean boundary."""
        path = self._path(n)
        if not path.exists():
            return
        good = 0
        for _payload, (seg, off) in self.iter_from((n, 0)):
            good = off if seg == n else good
        if good != self._sizes[n]:
            log.error("spool_tail_truncated", segment=n, from_bytes=self._sizes[n], to_bytes=good)
            os.truncate(path, good)
            self._sizes[n] = good

    def _last_payload(self) -> bytes | None:
        last = None
        for n in sorted(self._sizes, reverse=True):
            for payload, _ in self.iter_from((n, 0)):
                last = payload
            if last is not None:
                return last
        return None

    def _gc(self, force: bool = False) -> None:
        """Delete acknowledged segments past retention (oldest first; all of them if the spool is full)."""
        now = time.time()
        for n in sorted(self._sizes):
            if n >= self.acked[0] or n == self.active:
                break
            path = self._path(n)
            expired = now - path.stat().st_mtime > self.s.spool_retain_s
            if not (expired or force or self.total_bytes > self.s.spool_max_bytes):
                break
            fd = self._readers.pop(n, None)
            if fd is not None:
                os.close(fd)
            path.unlink(missing_ok=True)
            del self._sizes[n]
        ratio = self.fill_ratio
        if ratio >= self.s.spool_warn_ratio and not self._warned:
            self._warned = True
            log.error("spool_nearly_full", fill_ratio=round(ratio, 3), pending_bytes=self.pending_bytes,
                      max_bytes=self.s.spool_max_bytes, dir=str(self.dir))  # fmt: skip
        elif ratio < self.s.spool_warn_ratio / 2:
            self._warned = False

    def _gauges(self) -> None:
        SPOOL_BYTES.set(self.total_bytes)
        SPOOL_PENDING_BYTES.set(self.pending_bytes)
        SPOOL_PENDING_EVENTS.set(self.pending_events)
        SPOOL_FILL.set(self.fill_ratio)
