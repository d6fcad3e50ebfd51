"""compose/docker-compose.yml, checked without a Docker engine: structure, cross-references, and that
every setting it passes is one the code reads."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas.config import load_config
from tests.unit.test_deploy_env import REPO, known_env, provider_key_envs
from tollway.cli import build_parser

COMPOSE_DIR = REPO / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def dotenv(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            out[name.strip()] = value.strip()
    return out


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, for the values in `env`."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if op and op.endswith("?") and not value:
            raise AssertionError(f"${{{name}}} is required but not set: {arg}")
        if op and op.endswith("-") and not value:
            return arg
        return value or ""

    return _INTERPOLATION.sub(sub, text)


@pytest.fixture(scope="module")
def raw() -> str:
    return COMPOSE_FILE.read_text()


@pytest.fixture(scope="module")
def compose(raw: str) -> dict[str, Any]:
    return yaml.safe_load(interpolate(raw, dotenv(COMPOSE_DIR / ".env.example")))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_the_stack_has_every_tier(services: dict[str, Any]) -> None:
    for name in ("kafka", "clickhouse", "redis", "proxy", "meter", "billing", "gateway", "grafana"):
        assert name in services, f"compose has no {name} service"
    assert services["proxy"]["deploy"]["replicas"] == 2
    assert services["meter"]["deploy"]["replicas"] == 2


def test_every_service_has_a_pinned_image_or_a_build(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            build = svc["build"]
            dockerfile = (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve()
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        else:
            image = svc["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"


def test_tollway_services_run_real_cli_commands(services: dict[str, Any]) -> None:
    parser = build_parser()
    for name, svc in services.items():
        if "build" in svc:
            args = parser.parse_args(svc["command"])  # exits (SystemExit) on an unknown command
            assert args.command in ("proxy", "meter", "billing", "mock-upstream", "up"), name


def test_health_checks_probe_the_real_endpoints(services: dict[str, Any]) -> None:
    for name in ("kafka", "clickhouse", "redis", "proxy", "meter", "billing", "gateway", "grafana"):
        test = services[name]["healthcheck"]["test"]
        assert test and test[0] in ("CMD", "CMD-SHELL"), name
    proxy_check = " ".join(services["proxy"]["healthcheck"]["test"])
    assert "/healthz" in proxy_check and "/readyz" in proxy_check
    assert ":8080" in proxy_check
    meter_env = env_of(services["meter"])
    meter_check = " ".join(services["meter"]["healthcheck"]["test"])
    assert f"127.0.0.1:{meter_env['TOLLWAY_METER_HTTP_PORT']}'" in meter_check
    assert meter_env["TOLLWAY_METER_HTTP_HOST"] == "0.0.0.0", "scrapers on the compose network must reach it"
    assert meter_env["TOLLWAY_METER_HTTP_PORT"] in [str(p) for p in services["meter"]["expose"]]
    meter = meter_routes()
    assert "/healthz" in meter_check and "/readyz" in meter_check and {"/healthz", "/readyz", "/metrics"} <= meter
    billing_check = " ".join(services["billing"]["healthcheck"]["test"])
    assert "/healthz" in billing_check and ":8090" in billing_check
    assert "/ping" in " ".join(services["clickhouse"]["healthcheck"]["test"])
    assert "9092" in " ".join(services["kafka"]["healthcheck"]["test"])


def meter_routes() -> set[str]:
    """GET paths the standalone meter's server really has (services/meter/health.py)."""
    from services.meter.health import MeterHealth, create_app

    app = create_app(MeterHealth())
    return {r.resource.canonical for r in app.router.routes() if r.method == "GET" and r.resource is not None}


def test_start_order_waits_on_health(services: dict[str, Any]) -> None:
    valid = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: use the long depends_on form with conditions"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert spec["condition"] in valid
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy, which has no check"
    for tier in ("proxy", "meter", "billing"):
        deps = services[tier]["depends_on"]
        assert deps["kafka"]["condition"] == "service_healthy"
    assert services["billing"]["depends_on"]["clickhouse"]["condition"] == "service_healthy"
    assert services["meter"]["depends_on"]["billing"]["condition"] == "service_healthy"  # migrations first
    assert services["proxy"]["depends_on"]["redis"]["condition"] == "service_healthy"
    # No cycles.
    state: dict[str, int] = {}

    def visit(n: str) -> None:
        assert state.get(n) != 1, f"depends_on cycle through {n}"
        if state.get(n) == 2:
            return
        state[n] = 1
        for dep in services[n].get("depends_on") or {}:
            visit(dep)
        state[n] = 2

    for n in services:
        visit(n)


def test_networks_and_volumes_are_declared_and_bind_sources_exist(compose: dict[str, Any]) -> None:
    networks = set(compose.get("networks") or {})
    volumes = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for net in svc.get("networks") or []:
            assert net in networks, f"{name}: undeclared network {net}"
        for vol in svc.get("volumes") or []:
            if isinstance(vol, dict):
                kind, source = vol["type"], vol["source"]
            else:
                source = vol.split(":")[0]
                kind = "bind" if source.startswith((".", "/")) else "volume"
            if kind == "volume":
                assert source in volumes, f"{name}: undeclared volume {source}"
            else:
                assert (COMPOSE_DIR / source).exists(), f"{name}: bind source {source} missing"


def test_every_tollway_variable_is_one_the_code_reads(services: dict[str, Any]) -> None:
    known = known_env()
    used = {var for svc in services.values() for var in env_of(svc) if var.startswith("TOLLWAY_")}
    dockerfile = (COMPOSE_DIR / "Dockerfile").read_text()
    used |= set(re.findall(r"\b(TOLLWAY_[A-Z0-9_]+)=", dockerfile))
    unknown = sorted(used - known)
    assert not unknown, f"compose sets variables no code reads: {unknown}"


def test_provider_keys_match_the_config(services: dict[str, Any]) -> None:
    wanted = provider_key_envs(REPO / "tollway.yaml")
    given = {v for v in env_of(services["proxy"]) if not v.startswith("TOLLWAY_")}
    assert wanted <= given, f"proxy lacks provider keys {sorted(wanted - given)}"
    assert given <= wanted, f"proxy gets keys no provider uses: {sorted(given - wanted)}"


def test_services_share_one_config_and_one_kafka(services: dict[str, Any]) -> None:
    tiers = [services[n] for n in ("proxy", "meter", "billing")]
    for svc in tiers:
        env = env_of(svc)
        assert env["TOLLWAY_KAFKA_BOOTSTRAP"] == "kafka:9092"
        mounts = [v["target"] for v in svc["volumes"] if isinstance(v, dict)]
        assert env["TOLLWAY_CONFIG"] in mounts
    assert env_of(services["meter"])["TOLLWAY_METER_GROUP"]  # one group for both replicas
    ch = env_of(services["meter"])["TOLLWAY_CLICKHOUSE_URL"]
    assert ch.startswith("http://") and "@clickhouse:8123" in ch
    assert env_of(services["proxy"])["TOLLWAY_REDIS_URL"].startswith("redis://redis:6379")
    partitions = int(env_of(services["proxy"])["TOLLWAY_USAGE_PARTITIONS"])
    assert partitions >= services["meter"]["deploy"]["replicas"]


def test_every_required_secret_is_in_the_env_example(raw: str) -> None:
    example = dotenv(COMPOSE_DIR / ".env.example")
    for m in _INTERPOLATION.finditer(raw):
        assert m.group(1) in example, f"${{{m.group(1)}}} is not in compose/.env.example"


def test_the_demo_config_is_valid_and_points_at_the_mock(services: dict[str, Any]) -> None:
    config = load_config(COMPOSE_DIR / "tollway.demo.yaml")
    port = env_of(services["mock-upstream"])["TOLLWAY_MOCK_PORT"]
    for provider in config.providers.values():
        assert provider.base_url == f"http://mock-upstream:{port}/v1"
    assert services["mock-upstream"]["profiles"] == ["demo"]


def test_the_gateway_balances_over_the_proxy_replicas(services: dict[str, Any]) -> None:
    conf = (COMPOSE_DIR / "nginx.conf").read_text()
    assert "server proxy:8080" in conf
    assert "proxy_buffering off" in conf  # streaming responses pass through
    assert services["gateway"]["depends_on"]["proxy"]["condition"] == "service_healthy"


def test_grafana_is_provisioned_from_the_repo(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    assert "grafana-clickhouse-datasource" in env_of(grafana)["GF_INSTALL_PLUGINS"]
    sources = {v.split(":")[0] for v in grafana["volumes"] if isinstance(v, str)}
    assert "../deploy/grafana/provisioning" in sources and "../deploy/grafana/dashboards" in sources
    home = env_of(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (REPO / "deploy/grafana/dashboards" / Path(home).name).is_file()


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    # compose-spec is a Rust implementation of the Compose Specification: the same check
    # `docker compose config -q` makes, without needing a Docker engine or CLI plugin.
    from compose_spec import PyCompose

    text = interpolate(COMPOSE_FILE.read_text(), dotenv(COMPOSE_DIR / ".env.example"))
    spec = PyCompose.from_json(json.dumps(yaml.safe_load(text)))  # yaml resolves the <<: merge keys
    spec.validate()
    assert {"kafka", "clickhouse", "proxy", "meter", "billing", "redis", "grafana"} <= set(spec.service_names())


def test_the_compose_validator_rejects_what_docker_compose_rejects() -> None:
    from compose_spec import PyCompose

    for bad in (
        {"services": {"a": {"image": "x", "depends_on": {"b": {"condition": "bogus"}}}}},
        {"services": {"a": {"image": "x", "healthcheck": {"test": ["CMD", "x"], "intervall": "5s"}}}},
        {"services": {"a": {"image": "x", "volumes": ["relative/path:/data"]}}},
    ):
        with pytest.raises(ValueError):
            PyCompose.from_json(json.dumps(bad)).validate()
