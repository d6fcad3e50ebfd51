"""deploy/k8s/, checked without a cluster: kinds, selectors, probes against the apps' real routes,
references between objects, settings the code reads, and a ConfigMap config that loads."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas.config import parse_config
from tests.unit.test_deploy_env import REPO, known_env, provider_key_envs
from tollway.cli import build_parser

K8S = REPO / "deploy" / "k8s"
GCLOUD_KUBECTL = (Path("/usr/lib/google-cloud-sdk/bin/kubectl"), Path("/google-cloud-sdk/bin/kubectl"))
API_VERSIONS = {
    "Namespace": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1",
}


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def container(deploy: dict[str, Any]) -> dict[str, Any]:
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    return c


def env_names(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in c.get("env", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def serves_get(app: Any, path: str) -> bool:
    """Whether the app routes `GET path` to a handler (asked through Starlette's or aiohttp's own matching)."""
    from aiohttp import web
    from starlette.routing import Match

    if isinstance(app, web.Application):  # the standalone meter's
        return any(r.method == "GET" and r.resource is not None and r.resource.canonical == path
                   for r in app.router.routes())  # fmt: skip
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "query_string": b"", "headers": []}
    return any(r.matches(scope)[0] == Match.FULL for r in app.routes)


@pytest.fixture(scope="module")
def apps() -> dict[str, Any]:
    """Paths the proxy, billing and meter apps really serve (apps built, not started)."""
    from services.billing.app import create_app as billing_app
    from services.billing.settings import BillingSettings
    from services.meter.health import MeterHealth
    from services.meter.health import create_app as meter_app
    from services.proxy.app import create_app as proxy_app
    from services.proxy.settings import ProxySettings

    config = parse_config(yaml.safe_load((REPO / "tollway.yaml").read_text()))
    return {
        "tollway-proxy": proxy_app(ProxySettings(), config, "127.0.0.1:9"),
        "tollway-billing": billing_app(BillingSettings(), config, None, "127.0.0.1:9"),  # type: ignore[arg-type]
        "tollway-meter": meter_app(MeterHealth()),
    }


def test_every_object_has_a_known_kind_and_api_version(objects: list[dict[str, Any]]) -> None:
    for o in objects:
        assert API_VERSIONS.get(o["kind"]) == o["apiVersion"], f"{o['kind']}/{o['metadata']['name']}"
        assert o["metadata"]["name"]
    deployments = of_kind(objects, "Deployment")
    for name in ("tollway-proxy", "tollway-meter", "tollway-billing"):
        assert name in deployments
    assert "tollway-proxy" in of_kind(objects, "HorizontalPodAutoscaler")
    assert {"tollway-proxy", "tollway-meter"} <= set(of_kind(objects, "PodDisruptionBudget"))
    assert {"tollway-proxy", "tollway-billing"} <= set(of_kind(objects, "Service"))


def test_selectors_match_pod_labels(objects: list[dict[str, Any]]) -> None:
    deployments = of_kind(objects, "Deployment")
    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    for name, d in deployments.items():
        assert selects(d["spec"]["selector"]["matchLabels"], pod_labels[name]), name
    for name, svc in of_kind(objects, "Service").items():
        matched = [n for n, labels in pod_labels.items() if selects(svc["spec"]["selector"], labels)]
        assert len(matched) == 1, f"service {name} selects {matched}"
        c = container(deployments[matched[0]])
        port_names = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names or port["targetPort"] in port_names.values()
    for name, pdb in of_kind(objects, "PodDisruptionBudget").items():
        matched = [n for n, labels in pod_labels.items() if selects(pdb["spec"]["selector"]["matchLabels"], labels)]
        assert len(matched) == 1, f"pdb {name} selects {matched}"
        if "minAvailable" in pdb["spec"]:
            assert pdb["spec"]["minAvailable"] < deployments[matched[0]]["spec"]["replicas"], "PDB blocks drains"
    for name, hpa in of_kind(objects, "HorizontalPodAutoscaler").items():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments, name
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        assert container(deployments[target["name"]])["resources"]["requests"]["cpu"], "HPA on CPU needs a request"


def test_probes_hit_real_endpoints_on_the_listening_port(objects: list[dict[str, Any]], apps: dict[str, Any]) -> None:
    for app in apps.values():
        assert not serves_get(app, "/no-such-probe")  # the check can fail
    deployments = of_kind(objects, "Deployment")
    expected = {
        "tollway-proxy": ("TOLLWAY_PROXY_PORT", "/readyz"),
        "tollway-billing": ("TOLLWAY_BILLING_PORT", "/healthz"),
        "tollway-meter": ("TOLLWAY_METER_HTTP_PORT", "/readyz"),
    }
    for name, (port_var, readiness) in expected.items():
        c = container(deployments[name])
        listen = int(env_names(c)[port_var]["value"])
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert listen in ports.values()
        host_var = port_var.replace("_PORT", "_HOST")
        assert env_names(c)[host_var]["value"] == "0.0.0.0", "a pod must listen beyond loopback"
        assert c["readinessProbe"]["httpGet"]["path"] == readiness
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = c[probe]["httpGet"]
            assert serves_get(apps[name], get["path"]), f"{name} {probe}: {get['path']} is not a route"
            port = get["port"]
            assert (ports[port] if isinstance(port, str) else port) == listen


def test_prometheus_scrapes_metrics_on_the_listening_port(objects: list[dict[str, Any]], apps: dict[str, Any]) -> None:
    deployments = of_kind(objects, "Deployment")
    for name, app in apps.items():
        template = deployments[name]["spec"]["template"]
        notes = template["metadata"].get("annotations") or {}
        assert notes.get("prometheus.io/scrape") == "true", f"{name} is not scraped"
        ports = {p["containerPort"] for p in container(deployments[name])["ports"]}
        assert int(notes["prometheus.io/port"]) in ports, f"{name}: scrape port {notes['prometheus.io/port']}"
        assert serves_get(app, notes["prometheus.io/path"]), f"{name}: {notes['prometheus.io/path']} is not a route"


def test_containers_run_real_cli_commands(objects: list[dict[str, Any]]) -> None:
    parser = build_parser()
    wanted = {"tollway-proxy": "proxy", "tollway-meter": "meter", "tollway-billing": "billing"}
    for name, command in wanted.items():
        args = parser.parse_args(container(of_kind(objects, "Deployment")[name])["args"])
        assert args.command == command


def test_references_resolve_and_variables_are_ones_the_code_reads(objects: list[dict[str, Any]]) -> None:
    known = known_env()
    configmaps = of_kind(objects, "ConfigMap")
    secrets = of_kind(objects, "Secret")
    used: set[str] = set()
    for o in objects:
        if o["kind"] in ("ConfigMap", "Secret"):
            data = o.get("data") or o.get("stringData") or {}
            used |= {k for k in data if k.startswith("TOLLWAY_")}
    for name, d in of_kind(objects, "Deployment").items():
        spec = d["spec"]["template"]["spec"]
        c = container(d)
        for src in c.get("envFrom", []):
            ref = src.get("configMapRef") or src.get("secretRef")
            pool = configmaps if "configMapRef" in src else secrets
            assert ref["name"] in pool, f"{name}: envFrom {ref['name']} does not exist"
        for var, e in env_names(c).items():
            used.add(var) if var.startswith("TOLLWAY_") else None
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets[ref["name"]]["stringData"], f"{name}: {ref}"
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                assert vol["configMap"]["name"] in configmaps
    unknown = sorted(v for v in used if v.startswith("TOLLWAY_") and v not in known)
    assert not unknown, f"manifests set variables no code reads: {unknown}"


def test_the_configmap_holds_a_valid_config_mounted_where_the_services_look(objects: list[dict[str, Any]]) -> None:
    configmaps = of_kind(objects, "ConfigMap")
    config = parse_config(yaml.safe_load(configmaps["tollway-config"]["data"]["tollway.yaml"]))
    config_path = Path(configmaps["tollway-env"]["data"]["TOLLWAY_CONFIG"])
    for name, d in of_kind(objects, "Deployment").items():
        if name == "tollway-redis":
            continue
        c = container(d)
        vols = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: vols[m["name"]] for m in c["volumeMounts"]}
        assert mounts[str(config_path.parent)]["configMap"]["name"] == "tollway-config", name
        data_dir = configmaps["tollway-env"]["data"]["TOLLWAY_DATA_DIR"]
        assert data_dir in mounts, f"{name}: data dir is not writable (read-only root filesystem)"
    wanted = {p.api_key_env for p in config.providers.values() if p.api_key_env}
    assert set(of_kind(objects, "Secret")["tollway-provider-keys"]["stringData"]) == wanted
    assert wanted == provider_key_envs(REPO / "tollway.yaml")


def test_meter_replicas_fit_the_usage_partitions(objects: list[dict[str, Any]]) -> None:
    partitions = int(of_kind(objects, "ConfigMap")["tollway-env"]["data"]["TOLLWAY_USAGE_PARTITIONS"])
    meter = of_kind(objects, "Deployment")["tollway-meter"]
    assert meter["spec"]["replicas"] <= partitions
    proxy_hpa = of_kind(objects, "HorizontalPodAutoscaler")["tollway-proxy"]
    assert proxy_hpa["spec"]["minReplicas"] >= 2, "one proxy is a single point of failure"


def test_kubectl_kustomize_renders_into_one_namespace() -> None:
    # The Google Cloud SDK ships kubectl (with kustomize v5) off PATH; Debian's kubernetes-client (1.20) is too
    # old for the kustomization's `labels:` field, so it is not a system dependency.
    kubectl = shutil.which("kubectl") or next((str(p) for p in GCLOUD_KUBECTL if p.exists()), None)
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is not installed (nor the Google Cloud SDK's): the manifests cannot be rendered")
        pytest.skip("no kubectl")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for doc in yaml.safe_load_all(out.stdout):
        if doc and doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "tollway", doc["metadata"]["name"]
