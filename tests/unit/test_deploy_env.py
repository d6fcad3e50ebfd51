"""The environment variables the code reads, derived from the code itself (for the deploy file tests).

Settings classes: every pydantic-settings class with env prefix TOLLWAY_ in the services and schemas;
plus TOLLWAY_* names read straight from os.environ / os.getenv anywhere in the package (the CLI's).
"""

from __future__ import annotations

import importlib
import re
from functools import cache
from pathlib import Path

from pydantic_settings import BaseSettings

REPO = Path(__file__).resolve().parents[2]
SETTINGS_MODULES = (
    "schemas.settings",
    "services.proxy.settings",
    "services.meter.settings",
    "services.billing.settings",
    "services.mock_upstream.settings",
)
_DIRECT_READ = re.compile(r"""(?:environ\.get|environ\[|getenv)\(?\s*["'](TOLLWAY_[A-Z0-9_]+)["']""")


def _settings_classes() -> list[type[BaseSettings]]:
    for name in SETTINGS_MODULES:
        importlib.import_module(name)
    seen: list[type[BaseSettings]] = []
    stack = list(BaseSettings.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.model_config.get("env_prefix") == "TOLLWAY_" and cls.__module__.split(".")[0] in ("schemas", "services"):
            seen.append(cls)
    return seen


@cache
def known_env() -> frozenset[str]:
    names = set()
    for cls in _settings_classes():
        for field, info in cls.model_fields.items():
            alias = info.validation_alias if isinstance(info.validation_alias, str) else None
            names.add(alias.upper() if alias else f"TOLLWAY_{field.upper()}")
    for folder in ("tollway", "services", "schemas"):
        for path in (REPO / folder).rglob("*.py"):
            names.update(_DIRECT_READ.findall(path.read_text()))
    return frozenset(names)


def provider_key_envs(config_path: Path) -> set[str]:
    """The api_key_env names a tollway.yaml refers to: the only non-TOLLWAY_ secrets a pod needs."""
    from schemas.config import load_config

    return {p.api_key_env for p in load_config(config_path).providers.values() if p.api_key_env}


def test_known_env_covers_every_service_and_the_cli() -> None:
    env = known_env()
    for name in (
        "TOLLWAY_KAFKA_BOOTSTRAP",  # common
        "TOLLWAY_PROXY_PORT",  # proxy
        "TOLLWAY_METER_GROUP",  # meter
        "TOLLWAY_ADMIN_TOKEN",  # billing
        "TOLLWAY_MOCK_PORT",  # mock upstream
        "TOLLWAY_BILLING_URL",  # CLI, read from os.environ
    ):
        assert name in env
    assert "TOLLWAY_NOT_A_SETTING" not in env
