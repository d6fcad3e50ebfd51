"""The proxy spool on its own: append-only segments, in-order reads, a cursor that survives a restart,
a torn tail cut on open, and a hard bound that refuses rather than grows."""

from __future__ import annotations

import os

from services.proxy.spool import Spool, SpoolSettings


def test_records_come_back_in_order_and_the_cursor_survives_a_restart(tmp_path):
    s = Spool(tmp_path, SpoolSettings(spool_segment_bytes=200))
    for i in range(30):
        assert s.append(f"event-{i}".encode())
    assert len(list(tmp_path.glob("*.seg"))) > 1  # rolled into several segments
    got = s.read(s.acked, 10)
    assert [p for p, _ in got] == [f"event-{i}".encode() for i in range(10)]
    s.ack(got[-1][1], 10)
    s.close()

    again = Spool(tmp_path, SpoolSettings(spool_segment_bytes=200))
    assert again.pending_events == 20
    assert [p for p, _ in again.read(again.acked, 100)] == [f"event-{i}".encode() for i in range(10, 30)]
    assert again.last_payload == b"event-29"
    # A fresh broker needs the retained (already acknowledged) events too.
    assert [p for p, _ in again.read(again.replay_start(), 1)] == [b"event-0"]


def test_a_torn_tail_is_cut_and_appends_continue_cleanly(tmp_path):
    s = Spool(tmp_path)
    s.append(b"whole")
    s.close()
    (seg,) = tmp_path.glob("*.seg")
    with open(seg, "ab") as f:
        f.write(b"\x00\x00\x00\x50garbage")  # a header promising 80 bytes, then a crash
    again = Spool(tmp_path)
    again.append(b"next")
    assert [p for p, _ in again.read(again.acked, 10)] == [b"whole", b"next"]


def test_the_bound_refuses_new_events_instead_of_growing(tmp_path):
    s = Spool(tmp_path, SpoolSettings(spool_max_bytes=1000, spool_segment_bytes=300))
    accepted = sum(s.append(b"x" * 92) for _ in range(20))
    assert accepted == 10 and s.fill_ratio == 1.0 and s.degraded
    # Once the broker acknowledges, acknowledged segments make room again.
    s.ack(s.read(s.acked, 10)[-1][1], 10)
    s.sync(force=True)
    assert s.append(b"y" * 92)
    assert os.path.exists(tmp_path / "cursor")
