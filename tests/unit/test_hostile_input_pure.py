"""The pure parts of issue 17's fixes: scrubbing provider text, one-line settings errors, body validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.proxy.errors import InvalidRequest
from services.proxy.handler import validate_chat, validate_embeddings
from services.proxy.upstream import scrub, upstream_failure
from tollway.cli import settings_error
from tollway.servers import ServerSettings


def test_scrub_removes_masked_and_whole_keys_but_keeps_the_reason() -> None:
    text = "Incorrect API key provided: sk-proj-ab12****wxyz (Bearer tw-live-XYZ). Max context is 8192 tokens."
    out = scrub(text)
    assert "sk-" not in out and "****" not in out and "tw-live" not in out and "wxyz" not in out
    assert "Max context is 8192 tokens." in out


def test_a_provider_401_message_is_ours_entirely() -> None:
    err = upstream_failure(401, b"", {"error": {"message": "Incorrect API key provided: sk-ab****cd"}})
    assert err.status == 502 and "sk-" not in err.message and "Incorrect" not in err.message


def test_settings_errors_are_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLWAY_HTTP_MAX_CONNECTIONS", "many")
    with pytest.raises(ValidationError) as info:
        ServerSettings()
    line = settings_error(info.value)
    assert "\n" not in line and line.startswith("bad setting TOLLWAY_HTTP_MAX_CONNECTIONS: ")


@pytest.mark.parametrize("extra", [{"n": 2**62}, {"n": 0}, {"n": True}, {"max_tokens": 10**7},
                                   {"max_completion_tokens": -1}, {"top_logprobs": 21}])  # fmt: skip
def test_chat_counts_are_bounded(extra: dict) -> None:
    with pytest.raises(InvalidRequest):
        validate_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], **extra})


def test_embedding_inputs_are_bounded() -> None:
    validate_embeddings({"input": ["a"] * 2048})
    with pytest.raises(InvalidRequest):
        validate_embeddings({"input": ["a"] * 2049})
    with pytest.raises(InvalidRequest):
        validate_embeddings({"input": "a", "dimensions": 10**6})
