"""A bad config stops start-up with a message that names the field; the shipped config is valid."""

from __future__ import annotations

from decimal import Decimal

import pytest

from schemas.config import ConfigError, load_config, parse_config


def base() -> dict:
    return {
        "providers": {"p": {"base_url": "http://x"}},
        "models": {"m": {"aliases": ["mm"], "routes": [{"provider": "p"}], "prices": [{"input": 1, "output": 2}]}},
        "plans": {"free": {"rpm": 10}},
        "default_plan": "free",
    }


def test_shipped_config_loads_with_realistic_prices():
    cfg = load_config("tollway.yaml")
    assert {"gpt-4.1", "claude-sonnet-4.5", "gemini-2.5-flash", "deepseek-v3.2"} <= set(cfg.models)
    assert cfg.models["gpt-4.1"].prices[0].input == Decimal("2.00")
    assert cfg.resolve("gpt-4") == "gpt-4.1"
    assert len(cfg.plans) >= 2 and cfg.default_plan in cfg.plans


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda c: c["models"]["m"]["routes"][0].update(provider="nope"), "models.m.routes.0.provider"),
        (lambda c: c["models"]["m"]["prices"][0].update(input=-1), "models.m.prices.0.input"),
        (lambda c: c["models"]["m"]["prices"][0].update(input="abc"), "models.m.prices.0.input"),
        (lambda c: c["providers"]["p"].update(base_url="ftp://x"), "providers.p.base_url"),
        (lambda c: c["plans"]["free"].update(rpm=0), "plans.free.rpm"),
        (lambda c: c["plans"]["free"].update(rmp=5), "plans.free.rmp"),
        (lambda c: c.update(default_plan="gold"), "default_plan"),
        (lambda c: c["models"]["m"].update(routes=[]), "models.m.routes"),
        (lambda c: c["models"].update(x={"aliases": ["mm"], "routes": [{"provider": "p"}]}), "aliases"),
    ],
)
def test_bad_config_names_the_field(mutate, needle):
    cfg = base()
    mutate(cfg)
    with pytest.raises(ConfigError) as exc:
        parse_config(cfg, "test.yaml")
    assert needle in str(exc.value)
    assert "test.yaml" in str(exc.value)


def test_float_prices_become_exact_decimals():
    cfg = base()
    cfg["models"]["m"]["prices"][0]["input"] = 0.1
    assert parse_config(cfg).models["m"].prices[0].input == Decimal("0.1")


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_shipped_models_state_their_providers_output_caps():
    """tollway.yaml carries each chat model's published output cap, so an oversized max_tokens is refused
    before any upstream call (and before the quota reserves cap x n), via the model's alias too."""
    from services.proxy.errors import InvalidRequest
    from services.proxy.handler import check_output_cap
    from services.proxy.routing import Router

    config = load_config("tollway.yaml")
    router = Router(config)
    for name, m in config.models.items():
        assert (m.max_output_tokens is None) == (m.kind == "embedding"), name
    route = router.resolve("deepseek-chat", "chat.completions")  # an alias of deepseek-v3.2 (8K output)
    check_output_cap({"max_tokens": 8192}, route)
    with pytest.raises(InvalidRequest, match="8192"):
        check_output_cap({"max_completion_tokens": 8193}, route)
