"""Native providers: a provider declares the API it speaks, each endpoint routes only to providers that speak
it, and the loader refuses a route no endpoint of its model can use (naming it)."""

from __future__ import annotations

import pytest

from schemas.config import ConfigError, parse_config
from services.proxy.errors import ModelNotFound
from services.proxy.routing import Router


def config(models: dict, **providers: dict) -> dict:
    base = {"oa": {"base_url": "http://o/v1"}, "an": {"base_url": "http://a/v1", "api": "anthropic"},
            "compat": {"base_url": "http://c/v1", "api": "openai_compatible"}}  # fmt: skip
    return {"providers": base | providers, "models": models}


def test_each_endpoint_routes_only_to_providers_that_speak_it() -> None:
    cfg = parse_config(config({"claude": {"aliases": ["c"], "routes": [
        {"provider": "an", "model": "claude-x"}, {"provider": "compat", "model": "claude-x"}]}}))  # fmt: skip
    router = Router(cfg)
    assert [t.provider for t in router.resolve("c", "messages").targets] == ["an"]
    assert [t.provider for t in router.resolve("claude", "chat.completions").targets] == ["compat"]
    with pytest.raises(ModelNotFound, match=r"not served on the responses endpoint.*chat.completions, messages"):
        router.resolve("claude", "responses")
    # the route keeps its index in the model's list, so health and metrics name the same route everywhere
    assert router.resolve("claude", "chat.completions").targets[0].index == 1


def test_the_anthropic_key_goes_as_x_api_key_with_a_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AK", "sk-ant-1")
    monkeypatch.setenv("OK", "sk-oa-1")
    cfg = parse_config(config({"claude": {"routes": [{"provider": "an"}]}, "gpt": {"routes": [{"provider": "oa"}]}},
                              an={"base_url": "http://a/v1", "api": "anthropic", "api_key_env": "AK"},
                              oa={"base_url": "http://o/v1", "api_key_env": "OK"}))  # fmt: skip
    router = Router(cfg)
    an = router.resolve("claude", "messages").targets[0].headers
    assert an["x-api-key"] == "sk-ant-1" and an["anthropic-version"] == "2023-06-01" and "authorization" not in an
    assert router.resolve("gpt", "responses").targets[0].headers["authorization"] == "Bearer sk-oa-1"


def test_a_route_no_endpoint_can_use_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"models.emb.routes.1: provider 'an' speaks the anthropic API"):
        parse_config(config({"emb": {"kind": "embedding", "routes": [{"provider": "oa"}, {"provider": "an"}]}}))
    with pytest.raises(
        ConfigError,
        match=r"models.gpt.routes.0: provider 'compat'.*serves none of this model's endpoints \(responses\)",
    ):
        parse_config(config({"gpt": {"endpoints": ["responses"], "routes": [{"provider": "compat"}]}}))


def test_a_declared_endpoint_needs_a_route_that_serves_it() -> None:
    with pytest.raises(ConfigError, match=r"models.gpt.endpoints: no route's provider .* serves messages"):
        parse_config(config({"gpt": {"endpoints": ["chat.completions", "messages"], "routes": [{"provider": "oa"}]}}))
    with pytest.raises(ConfigError, match=r"models.gpt.endpoints: embeddings does not serve chat models"):
        parse_config(config({"gpt": {"endpoints": ["embeddings"], "routes": [{"provider": "oa"}]}}))


def test_declared_endpoints_narrow_what_the_model_serves() -> None:
    cfg = parse_config(config({"gpt": {"endpoints": ["chat.completions"], "routes": [{"provider": "oa"}]}}))
    with pytest.raises(ModelNotFound, match=r"served on: chat\.completions"):
        Router(cfg).resolve("gpt", "responses")


def test_an_unknown_api_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"providers.x.api"):
        parse_config(config({"gpt": {"routes": [{"provider": "oa"}]}}, x={"base_url": "http://x", "api": "grpc"}))


def test_one_allow_list_rule_for_calling_listing_and_retrieving() -> None:
    cfg = parse_config(config({
        "gpt": {"aliases": ["g", "fast"], "routes": [{"provider": "oa"}]},
        "claude": {"aliases": ["c"], "routes": [{"provider": "an"}]},
        "other": {"routes": [{"provider": "oa"}]},
    }))  # fmt: skip
    router = Router(cfg)
    plan = frozenset({"gpt", "c"})  # a model by its name (all its names), another by one alias only
    callable_by = {n for n in ("gpt", "g", "fast", "claude", "c", "other")
                   if any(_resolves(router, n, e, plan) for e in ("chat.completions", "messages"))}  # fmt: skip
    assert callable_by == {"gpt", "g", "fast", "c"}
    # the list shows one id per model, the one it may be called by; retrieve agrees with resolve on every name
    assert router.callable_ids(plan) == [("c", "claude"), ("gpt", "gpt")]
    assert {n for n in ("gpt", "g", "fast", "claude", "c", "other") if router.model_of(n, plan)} == callable_by
    assert router.model_of("fast", plan) == "gpt" and router.model_of("nope", None) is None
    assert router.callable_ids(None) == [("claude", "claude"), ("gpt", "gpt"), ("other", "other")]


def _resolves(router: Router, name: str, endpoint: str, allowed: frozenset[str]) -> bool:
    try:
        router.resolve(name, endpoint, allowed)
    except ModelNotFound as err:
        return "not served on" in str(err)  # allowed, but on another endpoint: still callable by that name
    return True
