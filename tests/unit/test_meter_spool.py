"""The proxy spool on its own: append-only segments, in-order reads, a cursor that survives a restart,
a torn tail cut on open, a hard bound that refuses rather than grows, records that carry their Kafka key,
and a spool written before records carried keys still read after an upgrade."""

from __future__ import annotations

import os
import struct
import zlib

from services.proxy.spool import CURSOR, Spool, SpoolSettings


def keyless(payload: bytes) -> bytes:
    """A record as the spool wrote it before records carried their key: [u32 length][u32 crc32][payload]."""
    return struct.pack(">II", len(payload), zlib.crc32(payload)) + payload


def test_records_come_back_in_order_and_the_cursor_survives_a_restart(tmp_path):
    s = Spool(tmp_path, SpoolSettings(spool_segment_bytes=200))
    for i in range(30):
        assert s.append(f"event-{i}".encode())
    assert len(list(tmp_path.glob("*.seg"))) > 1  # rolled into several segments
    got = s.read(s.acked, 10)
    assert [p for _, p, _ in got] == [f"event-{i}".encode() for i in range(10)]
    s.ack(got[-1][2], 10)
    s.close()

    again = Spool(tmp_path, SpoolSettings(spool_segment_bytes=200))
    assert again.pending_events == 20
    assert [p for _, p, _ in again.read(again.acked, 100)] == [f"event-{i}".encode() for i in range(10, 30)]
    assert again.last_payload == b"event-29"
    # A fresh broker needs the retained (already acknowledged) events too.
    assert [p for _, p, _ in again.read(again.replay_start(), 1)] == [b"event-0"]


def test_a_torn_tail_is_cut_and_appends_continue_cleanly(tmp_path):
    s = Spool(tmp_path)
    s.append(b"whole")
    s.close()
    (seg,) = tmp_path.glob("*.seg")
    with open(seg, "ab") as f:
        f.write(b"\x00\x00\x00\x50garbage")  # a header promising 80 bytes, then a crash
    again = Spool(tmp_path)
    again.append(b"next")
    assert [p for _, p, _ in again.read(again.acked, 10)] == [b"whole", b"next"]


def test_the_bound_refuses_new_events_instead_of_growing(tmp_path):
    s = Spool(tmp_path, SpoolSettings(spool_max_bytes=1000, spool_segment_bytes=300))
    accepted = sum(s.append(b"x" * 90) for _ in range(20))  # 100 bytes a record, framing included
    assert accepted == 10 and s.fill_ratio == 1.0 and s.degraded
    # Once the broker acknowledges, acknowledged segments make room again.
    s.ack(s.read(s.acked, 10)[-1][2], 10)
    s.sync(force=True)
    assert s.append(b"y" * 90)
    assert os.path.exists(tmp_path / "cursor")


def test_a_record_carries_its_key_beside_its_payload(tmp_path):
    s = Spool(tmp_path)
    s.append(b'{"team_id":"t1"}', b"t1")
    s.append(b"{}", b"")
    s.append(b"x" * 300_000, "t\u00e9am".encode())  # longer than one read chunk: read again from its start
    got = s.read(s.acked, 10)
    assert [(k, p) for k, p, _ in got] == [
        (b"t1", b'{"team_id":"t1"}'),
        (b"", b"{}"),
        ("t\u00e9am".encode(), b"x" * 300_000),
    ]
    assert [p for p, _ in s.iter_from(s.acked)] == [p for _, p, _ in got]
    s.close()
    again = Spool(tmp_path)
    assert again.pending_events == 3 and again.last_payload == b"x" * 300_000


def test_a_spool_from_before_keys_is_read_resumed_and_appended_to(tmp_path):
    # an older proxy's spool: two segments, the first half acknowledged, the cursor in the second
    old = [f'{{"team_id":"t{i}","proxy_seq":{i}}}'.encode() for i in range(6)]
    (tmp_path / "000000000000.seg").write_bytes(b"".join(keyless(p) for p in old[:3]))
    (tmp_path / "000000000001.seg").write_bytes(b"".join(keyless(p) for p in old[3:]))
    (tmp_path / "cursor").write_bytes(CURSOR.pack(1, len(keyless(old[3]))))
    s = Spool(tmp_path)
    assert s.pending_events == 2 and s.last_payload == old[5]
    assert [(k, p) for k, p, _ in s.read(s.acked, 10)] == [(None, old[4]), (None, old[5])]
    # the new code appends keyed records to the old active segment: both kinds follow each other in order
    s.append(b'{"team_id":"t6"}', b"t6")
    assert [(k, p) for k, p, _ in s.read(s.acked, 10)] == [(None, old[4]), (None, old[5]), (b"t6", b'{"team_id":"t6"}')]
    assert [p for _, p, _ in s.read(s.replay_start(), 10)] == [*old, b'{"team_id":"t6"}']  # a fresh broker: all
    s.close()
    again = Spool(tmp_path)  # and so after another restart, the torn-tail check passing over both kinds
    assert again.pending_events == 3 and again.last_payload == b'{"team_id":"t6"}'
    assert sorted(f.name for f in tmp_path.glob("*.seg")) == ["000000000000.seg", "000000000001.seg"]


def test_a_corrupt_keyed_record_ends_the_segment_like_a_keyless_one(tmp_path):
    s = Spool(tmp_path)
    s.append(b"first", b"k")
    s.append(b"second", b"k")
    s.close()
    (seg,) = tmp_path.glob("*.seg")
    raw = bytearray(seg.read_bytes())
    raw[-1] ^= 0xFF  # the last record's payload no longer matches its CRC
    seg.write_bytes(bytes(raw))
    again = Spool(tmp_path)
    assert [(k, p) for k, p, _ in again.read(again.acked, 10)] == [(b"k", b"first")]
