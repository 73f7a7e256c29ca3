"""The Dockerfile, the compose file and the Kubernetes manifests, checked without a container
engine or a cluster: hadolint, the compose specification's JSON schema, and the Kubernetes
OpenAPI schemas (kubernetes-validate), plus the properties the deployment docs promise."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.30.0"  # the oldest minor version the manifests promise to work with


def tool(name: str) -> str:
    """Return the path of a command installed into this venv by `make setup`."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else (shutil.which(name) or pytest.fail(f"{name} is not installed"))


def manifests() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def test_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_healthcheck():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]

    assert users
    assert users[-1].isdigit()
    assert users[-1] != "0"
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert any("senab models pull" in line for line in lines)  # the model is in the image
    assert sum(line.startswith("FROM ") for line in lines) >= 2  # multi-stage


def test_compose_file_matches_the_compose_specification():
    result = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                             str(ROOT / "docker-compose.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_publishes_on_loopback_and_persists_redis():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    redis = services["redis"]

    for name in ("server", "server-gpu"):
        assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"])
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[name]["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert "--appendonly" in redis["command"]
    assert redis["volumes"][0].split(":")[0] in compose["volumes"]
    assert redis["healthcheck"]["test"]
    assert services["server-gpu"]["profiles"] == ["gpu"]
    assert (ROOT / ".env.example").exists()


@pytest.mark.parametrize("path, doc", manifests(), ids=lambda value: getattr(value, "name", None) or "")
def test_manifest_is_valid_kubernetes(path, doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomizations_list_existing_files():
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(kustomization.read_text())["resources"]:
            assert (kustomization.parent / resource).exists(), f"{kustomization}: {resource}"


def test_deployment_probes_resources_and_scraping():
    deployment = next(doc for _, doc in manifests() if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "senab")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]

    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["tmp"] == "/tmp"
    assert {v["name"] for v in pod["spec"]["volumes"]} >= {"tmp"}
    assert {doc["kind"] for _, doc in manifests()} >= {"Service", "HorizontalPodAutoscaler",
                                                        "PodDisruptionBudget", "StatefulSet"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("overlay", ["trial", "external-redis"])
def test_overlay_renders_to_valid_kubernetes(overlay):
    rendered = subprocess.run(["kubectl", "kustomize", str(DEPLOY / overlay)], capture_output=True, text=True,
                              check=True).stdout
    for doc in yaml.safe_load_all(rendered):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
