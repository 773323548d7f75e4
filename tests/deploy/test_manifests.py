"""deploy/: the YAML and JSON parse, the Kubernetes manifests validate against the Kubernetes schemas
(kubernetes-validate's bundled ones), and the Deployment keeps its operational promises."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from helix_server.config import ServerConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CORE_MANIFESTS = ["deployment.yaml", "service.yaml", "hpa.yaml"]


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.y*ml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    assert yaml.safe_load(path.read_text())


def test_dashboard_json_parses():
    dashboard = json.loads((DEPLOY / "grafana/dashboards/helix.json").read_text())
    assert all(panel["targets"] for panel in dashboard["panels"])


@pytest.mark.parametrize("name", CORE_MANIFESTS)
def test_manifest_validates_against_kubernetes_schema(name):
    for document in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()):
        kubernetes_validate.validate(document, "1.30.0", strict=True)


def test_schema_validation_catches_mistakes():
    deployment = yaml.safe_load((DEPLOY / "k8s/deployment.yaml").read_text())
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30.0", strict=True)


def test_deployment_probes_and_drain():
    deployment = yaml.safe_load((DEPLOY / "k8s/deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    args = container["args"]
    shutdown = float(args[args.index("--shutdown-timeout") + 1]) if "--shutdown-timeout" in args else (
        ServerConfig().shutdown_timeout
    )
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > shutdown + pre_stop
    assert container["resources"]["requests"]


def test_custom_resources_have_their_fields():
    pool = yaml.safe_load((DEPLOY / "k8s/inferencepool.yaml").read_text())
    assert pool["kind"] == "InferencePool" and pool["spec"]["targetPorts"][0]["number"] == 8000
    monitor = yaml.safe_load((DEPLOY / "k8s/servicemonitor.yaml").read_text())
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    hpa = yaml.safe_load((DEPLOY / "k8s/hpa.yaml").read_text())
    adapter = yaml.safe_load((DEPLOY / "k8s/prometheus-adapter-rules.yaml").read_text())
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == adapter["rules"]["custom"][0]["name"]["as"]
