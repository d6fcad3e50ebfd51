"""Keeps the benchmark scripts from rotting: every bench module imports, and the pure parts (wrk summary
parsing, the table, profile summaries, the bench gateway config) work on tiny fake inputs. No wrk, no peers."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import bench
from bench import loadgen, profile, run, streaming, table, targets
from schemas.config import GatewayConfig


def test_every_bench_module_imports() -> None:
    names = [m.name for m in pkgutil.iter_modules(bench.__path__) if m.name != "envs"]
    assert {"run", "table", "loadgen", "targets", "proxy_bench"} <= set(names)
    for name in names:
        importlib.import_module(f"bench.{name}")


def test_wrk_summary_line_is_parsed_into_milliseconds() -> None:
    out = (
        "Running 2s test\n" + loadgen.MARK + '{"requests":200,"duration_us":2000000,"bytes":1,"non2xx":1,"connect":0,'
        '"read":0,"write":0,"timeout":2,"p50_us":1500,"p90_us":2000,"p99_us":3000,"p999_us":4000,"max_us":5000,'
        '"mean_us":1600.5}\n'
    )
    r = loadgen.parse(out)
    assert (r.rps, r.p50_ms, r.p99_ms, r.errors) == (100.0, 1.5, 3.0, 3)


def test_lua_script_carries_body_and_headers() -> None:
    script = loadgen.lua_script(b'{"model":"m"}', {"Authorization": "Bearer k"})
    assert '[==[{"model":"m"}]==]' in script and 'wrk.headers["Authorization"] = "Bearer k"' in script


def test_chat_body_is_about_one_kilobyte() -> None:
    import orjson

    assert 800 <= len(orjson.dumps(loadgen.chat_body("bench-instant"))) <= 1300


def _scenario(p50: float, p99: float, rps: float, **extra: float) -> dict:
    return {"requests": int(rps * 8), "rps": rps, "errors": 0, "p50_ms": p50, "p99_ms": p99, **extra}


def fake_result() -> dict:
    sc = lambda a, b, c, **kw: _scenario(a, b, c, **kw)  # noqa: E731
    return {
        "meta": {"started": "2026-01-01T00:00:00Z", "cpu_model": "Fake CPU", "nproc": 2, "load_before": 0.1},
        "proxy": {
            "direct": {"scenarios": {"c1_instant": sc(0.2, 0.4, 4000), "c32_50ms": sc(51, 53, 620),
                                     "max_instant": sc(10, 20, 5000)},
                       "stream": {"ttft_p50_ms": 0.5, "ttft_p99_ms": 0.9}},
            "tollway": {"scenarios": {"c1_instant": sc(0.6, 1.2, 1500), "c32_50ms": sc(51.5, 56, 610),
                                      "max_instant": sc(30, 40, 2100, gateway_cpu=1.0, rps_per_core=2100)},
                        "stream": {"ttft_p50_ms": 1.0, "ttft_p99_ms": 2.0},
                        "cache": {"cache_c1": sc(0.3, 0.5, 3000), "cache_max": sc(5, 9, 6000)}},
            "litellm": {"scenarios": {"c1_instant": sc(5, 20, 150), "c32_50ms": sc(90, 400, 200),
                                      "max_instant": sc(300, 900, 200, gateway_cpu=1.0, rps_per_core=200)}},
            "tollway+aiohttp": {"scenarios": {"c1_instant": sc(0.5, 1.0, 1700), "max_instant": sc(20, 30, 2500)}},
        },
        "emit": {"emit_us": 5.5, "end_to_end": {"cpu_us_per_event": 40.0}},
        "meter": {"meter_topic_to_clickhouse_eps": 60000, "raw_consume_eps": 110000, "meters_2_eps": 120000},
        "quota": {"cross_p50_ms": 40, "cross_p99_ms": 120, "overshoot_max_tokens": 2},
        "errors": {"portkey": "did not start"},
    }  # fmt: skip


def test_table_shows_added_latency_ratios_and_targets() -> None:
    res = fake_result()
    assert table.added(res, "tollway", "c1_instant") == pytest.approx((0.4, 0.8))
    text = table.render(res)
    assert "+0.40 / +0.80" in text  # c=1 added p50 / p99 through Tollway
    assert "10.5x" in text  # Tollway vs LiteLLM max req/s
    assert "2,100" in text and "60,000" in text and "40 / 120; over 2" in text
    assert "tollway+aiohttp: c=1 added p50 / p99 ms" in text
    assert "! portkey: did not start" in text
    assert "120,000" in text  # two meter processes
    assert text.count("NO") == 0  # every target in the fake result is met


def test_table_marks_a_meter_slower_than_half_the_raw_consume_rate() -> None:
    res = fake_result()
    res["meter"]["raw_consume_eps"] = 200_000
    text = table.render(res)
    line = next(ln for ln in text.splitlines() if "events/s / raw consume" in ln)
    assert "0.30" in line and "NO" in line
    assert text.count("NO") == 1


def test_table_survives_an_empty_result() -> None:
    assert "c=1 instant" in table.render({"meta": {}, "proxy": {}, "errors": {}})


def test_last_json_finds_an_external_scripts_result() -> None:
    assert run.last_json('log line\n{"events_per_s": 5}\n') == {"events_per_s": 5}
    assert run.last_json('noise\n{\n  "p99_ms": 3\n}\n') == {"p99_ms": 3}
    assert run.last_json("no json here") is None


def test_quota_lag_sentences_are_parsed() -> None:
    text = (
        "trials=100\n"
        "cross-proxy crossing->first 429 (billing signal path): p50 41.5 ms  p99 97.0 ms  max 120.0 ms\n"
        "same-proxy crossing->first 429 (local counting):       p50 0.4 ms  p99 1.1 ms\n"
        "overshoot over 10 bursts of 40 concurrent calls (limit 300 tokens): max 12 tokens, mean 3.5; ...\n"
    )
    got = run.parse_quota_text(text)
    assert got == {"cross_p50_ms": 41.5, "cross_p99_ms": 97.0, "same_p50_ms": 0.4, "same_p99_ms": 1.1,
                   "overshoot_max_tokens": 12, "overshoot_mean_tokens": 3.5}  # fmt: skip
    text = text.replace("cross-proxy", "      key limit: cross-proxy").replace(
        "same-proxy", "      key limit: same-proxy"
    )
    text += (
        "end-user budget: cross-proxy crossing->first 429 (billing signal path): p50 50.0 ms  p99 99.5 ms  max 1 ms\n"
        "end-user budget: same-proxy crossing->first 429 (local counting):       p50 0.5 ms  p99 1.5 ms\n"
    )
    got = run.parse_quota_text(text)
    assert got is not None and (got["cross_p50_ms"], got["end_user_cross_p50_ms"], got["end_user_same_p99_ms"]) == (
        41.5, 50.0, 1.5)  # fmt: skip


def test_profile_summary_ranks_frames_by_self_and_inclusive_time() -> None:
    collapsed = (
        "main (tollway/cli.py:1);post (httpx/_client.py:2);scan (httpcore/pool.py:3) 30\n"
        "main (tollway/cli.py:1);serve (services/proxy/handler.py:9) 10\n"
    )
    s = profile.summarize(collapsed)
    assert s["samples"] == 40
    assert s["self"][0] == {"frame": "scan (httpcore/pool.py)", "share": 0.75}
    assert s["inclusive"][0]["frame"] == "main (tollway/cli.py)" and s["inclusive"][0]["share"] == 1.0
    assert s["by_package_self"]["services/proxy"] == 0.25


def test_streaming_percentiles() -> None:
    vals = [i / 1000 for i in range(1, 101)]
    assert streaming.pct(vals, 50) == pytest.approx(0.05, abs=0.002)
    assert streaming.pct(vals, 99) == pytest.approx(0.099, abs=0.002)


def test_bench_gateway_config_is_a_valid_tollway_config() -> None:
    cfg = targets.tollway_config({"instant": "http://127.0.0.1:1/v1", "50ms": "http://127.0.0.1:2/v1"})
    parsed = GatewayConfig.model_validate(cfg)
    assert set(parsed.models) == {"bench-instant", "bench-50ms", "bench-claude-instant", "bench-claude-50ms"}
    assert parsed.default_plan == "bench"
    assert parsed.model_endpoints("bench-claude-instant") == ("messages",)  # routed natively, /v1/messages only


async def test_request_path_harness_answers_and_restores_the_upstream_hop() -> None:
    from bench import request_path
    from services.proxy import handler

    real = handler.post_json
    per_call = await request_path.measure(30)
    assert 0 < per_call < 0.1  # seconds of CPU per call; it raises if any call was not a 200
    assert 0 < await request_path.measure(30, api="messages") < 0.1  # /v1/messages, the same way
    assert 0 < await request_path.measure(30, api="responses") < 0.1
    assert handler.post_json is real


async def test_upstream_hop_forwards_every_api_to_a_real_mock_and_splits_cpu_from_waiting() -> None:
    from bench import upstream_hop

    out = await upstream_hop.measure(calls=10, rounds=2, warmup=2)  # raises if any call was not a 200
    for api in ("chat", "messages", "responses"):
        m = out[api]
        assert 0 < m["cpu_us"] < m["wall_us"] and abs(m["wait_us"] - (m["wall_us"] - m["cpu_us"])) <= 0.2, (api, m)


def test_bench_fixtures_of_their_own_are_valid_contract_objects() -> None:
    from bench import meter_throughput, quota_lag
    from schemas.events import UsageEvent

    e = UsageEvent.model_validate_json(meter_throughput.usage_event(7))
    assert (e.team_id, e.key_id, e.prompt_tokens, e.completion_tokens, e.proxy_seq) == ("team-7", "k7", 107, 7, 8)
    config = quota_lag.gateway_config("http://127.0.0.1:1/v1")
    assert config.resolve("gpt-4.1") == "gpt-4.1" and config.plans["default"].tokens_per_month is None


def test_table_shows_the_messages_rows_against_chats_added_latency() -> None:
    res = fake_result()
    sc = _scenario
    res["proxy"]["direct"]["messages"] = {"scenarios": {"c1_instant": sc(0.2, 0.4, 4000), "max_instant": sc(10, 20, 5000)},
                                          "stream": {"ttft_p50_ms": 0.5, "ttft_p99_ms": 0.9}}  # fmt: skip
    res["proxy"]["tollway"]["messages"] = {"scenarios": {"c1_instant": sc(0.62, 1.3, 1500), "max_instant": sc(30, 40, 2000)},
                                           "stream": {"ttft_p50_ms": 1.9, "ttft_p99_ms": 3.0}}  # fmt: skip
    lines = table.render(res).splitlines()
    c1 = next(ln for ln in lines if ln.startswith("/v1/messages c=1"))
    assert "+0.42 / +0.90" in c1 and not c1.endswith(("yes", "NO"))  # judged side by side, not here
    assert "2,000 (40%)" in next(ln for ln in lines if ln.startswith("/v1/messages c=64"))
    stream = next(ln for ln in lines if ln.startswith("/v1/messages stream"))
    assert "+1.40 / +2.10" in stream and not stream.endswith(("yes", "NO"))


def test_side_by_side_rows_judge_each_api_against_chats_added_latency_of_the_same_rounds() -> None:
    res = fake_result()
    per = {"chat": {"direct_p50_ms": 0.4, "tollway_added_p50_ms": 0.7, "tollway_of_chat": 1.0},
           "messages": {"direct_p50_ms": 0.5, "tollway_added_p50_ms": 0.76, "tollway_of_chat": 1.086},
           "responses": {"direct_p50_ms": 0.5, "tollway_added_p50_ms": 0.8, "tollway_of_chat": 1.143}}  # fmt: skip
    res["proxy"]["side_by_side"] = {"plain": per, "stream": {"chat": per["chat"]}}
    lines = table.render(res).splitlines()
    row = {api: next(ln for ln in lines if ln.startswith(f"side by side {api} c=1")) for api in per}
    assert "+0.70 (100%)" in row["chat"] and not row["chat"].endswith(("yes", "NO"))
    assert "+0.76 (109%)" in row["messages"] and row["messages"].endswith("yes")
    assert "+0.80 (114%)" in row["responses"] and row["responses"].endswith("NO")
    assert sum(ln.startswith("side by side") for ln in lines) == 4  # stream: chat only, nothing invented


def test_side_by_side_plain_call_reads_exactly_one_content_length_answer() -> None:
    import socket
    import threading

    from bench import side_by_side

    a, b = socket.socketpair()
    answer = b'HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{"ok":true}'

    def serve() -> None:
        for _ in range(2):
            b.recv(65536)
            b.sendall(answer[:20])
            b.sendall(answer[20:])
        b.recv(65536)
        b.sendall(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 2\r\n\r\n{}")

    threading.Thread(target=serve, daemon=True).start()
    try:
        assert side_by_side.plain_call(a, b"GET /") > 0
        assert side_by_side.plain_call(a, b"GET /") > 0  # nothing of the first answer left to misread
        with pytest.raises(RuntimeError, match="plain call failed"):
            side_by_side.plain_call(a, b"GET /")
    finally:
        a.close()
        b.close()


def test_responses_rows_and_first_delta_match() -> None:
    from bench import proxy_bench

    res = fake_result()
    stream = {"ttft_p50_ms": 0.5, "ttft_p99_ms": 1.0}
    res["proxy"]["direct"]["responses"] = {"scenarios": {"max_instant": _scenario(1, 2, 4000)}, "stream": stream}
    res["proxy"]["tollway"]["responses"] = {"scenarios": {"max_instant": _scenario(2, 4, 2000)},
                                            "stream": {"ttft_p50_ms": 1.5, "ttft_p99_ms": 3.0}}  # fmt: skip
    text = table.render(res)
    assert "/v1/responses stream c=1: added TTFT" in text and "+1.00 / +2.00" in text
    assert "2,000 (50%)" in text
    event = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":4,'
    event += b'"item_id":"msg_0123456789abcdef","output_index":0,"content_index":0,"delta":"Hi","logprobs":[]}'
    assert streaming.RESPONSES_FIRST.search(event)
    assert not streaming.RESPONSES_FIRST.search(event.replace(b'"delta":"Hi"', b'"delta":""'))
    body = proxy_bench.responses_body("m", stream=True)
    assert body["stream"] is True and body["max_output_tokens"] == 64 and isinstance(body["input"], str)
