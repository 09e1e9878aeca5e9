"""The deployment in ``deploy/`` and the ``Dockerfile``, checked offline.

Built-in kinds are validated against the Kubernetes JSON schemas bundled with ``kubernetes-validate``
(no cluster, no network: sockets are closed for these tests). The KubeRay ``RayCluster`` is a custom
resource whose schema ships with no Python package, so its structure is checked here by hand. The
rest is consistency between the manifests and the code: every ``MAML_*`` variable is a ``Settings``
field and the API's literal configuration is accepted by ``Settings``, one image everywhere, secrets
referenced and never inlined, the shared volume mounted at the storage path on every node.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.33.0"  # schemas bundled with kubernetes-validate; a version the major clouds run
# The packages pyproject.toml installs (api, service, workers, cli): the image must copy each.
TOP_LEVEL_PACKAGES = [pattern.rstrip("*") for pattern in tomllib.loads((ROOT / "pyproject.toml").read_text())
                      ["tool"]["setuptools"]["packages"]["find"]["include"]]
# Environment variables that hold credentials: always from a Secret.
SECRET_ENV = {"MAML_DATABASE_URL", "DATABASE_URL", "MAML_ADMIN_TOKEN", "RAY_AUTH_TOKEN",
              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
SECRET_WORDS = re.compile(r"TOKEN|PASSWORD|SECRET|KEY|DATABASE_URL|CREDENTIAL", re.IGNORECASE)


def _load() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                documents.append((path.name, document))
    return documents


DOCUMENTS = _load()
BUILT_IN = [(name, doc) for name, doc in DOCUMENTS if not doc["apiVersion"].startswith("ray.io/")]


def _one(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in DOCUMENTS if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/, found {len(found)}"
    return found[0]


def _api_deployment() -> dict[str, Any]:
    return _one("Deployment")


def _ray_cluster() -> dict[str, Any]:
    return _one("RayCluster")


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for the API replicas, the Ray head and every Ray worker group."""
    cluster = _ray_cluster()["spec"]
    specs = [("api", _api_deployment()["spec"]["template"]["spec"]),
             ("ray head", cluster["headGroupSpec"]["template"]["spec"])]
    specs += [(f"ray workers {group['groupName']}", group["template"]["spec"])
              for group in cluster["workerGroupSpecs"]]
    return specs


def _containers() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{where}/{container['name']}", container)
            for where, spec in _pod_specs() for container in spec["containers"]]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the network fails the test: the schemas must be the bundled ones."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# -- schemas ---------------------------------------------------------------------------------------


def test_the_schema_version_is_bundled() -> None:
    assert KUBERNETES_VERSION in all_versions()


def test_deploy_holds_the_expected_kinds() -> None:
    kinds = sorted(doc["kind"] for _, doc in DOCUMENTS)
    assert kinds == sorted(["RayCluster", "Deployment", "Service", "PodDisruptionBudget",
                            "PersistentVolumeClaim", "PersistentVolumeClaim"])


@pytest.mark.parametrize(("filename", "document"), BUILT_IN,
                         ids=[f"{name}:{doc['kind']}/{doc['metadata']['name']}" for name, doc in BUILT_IN])
def test_built_in_kinds_validate(filename: str, document: dict[str, Any]) -> None:
    # strict: fields the schema does not know (a typo, a wrong level) fail too
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_validation_catches_errors() -> None:
    """The validator is not a no-op: a misspelt field and a wrong type both fail."""
    deployment = _api_deployment()
    typo = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)
    wrong_type = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSION, strict=True)


def test_ray_cluster_structure() -> None:
    """KubeRay's CRD schema is not in any installable Python package: the fields KubeRay needs."""
    cluster = _ray_cluster()
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["metadata"]["name"]
    spec = cluster["spec"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", spec["rayVersion"])
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(value, str) for value in head["rayStartParams"].values()), "rayStartParams are strings"
    groups = spec["workerGroupSpecs"]
    assert groups, "no worker group"
    for group in [head, *groups]:
        containers = group["template"]["spec"]["containers"]
        assert containers and all(container["image"] and container["name"] for container in containers)
    for group in groups:
        assert group["groupName"]
        assert isinstance(group["rayStartParams"], dict)
        assert all(isinstance(value, str) for value in group["rayStartParams"].values())
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # The containers' pod templates are Kubernetes pod specs: validate them as such, inside a Pod.
    for where, pod_spec in _pod_specs()[1:]:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": where.replace(" ", "-")}, "spec": pod_spec}
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


# -- consistency with the code -----------------------------------------------------------------


def test_every_maml_variable_is_a_setting() -> None:
    names = {f"MAML_{field.upper()}" for field in Settings.model_fields}
    for where, container in _containers():
        for variable in _env(container):
            if variable.startswith("MAML_"):
                assert variable in names, f"{where}: {variable} is no field of service.config.Settings"


def test_the_api_configuration_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API's literal MAML_* values, with placeholders for the secrets, pass Settings' validation."""
    for variable in list(os.environ):
        if variable.startswith("MAML_") or variable in ("DATABASE_URL", "RAY_ADDRESS"):
            monkeypatch.delenv(variable)
    env = _env(_api_deployment()["spec"]["template"]["spec"]["containers"][0])
    for variable, entry in env.items():
        if variable.startswith("MAML_") and "value" in entry:
            monkeypatch.setenv(variable, entry["value"])
    monkeypatch.setenv("MAML_ADMIN_TOKEN", "0123456789abcdef0123456789abcdef")
    monkeypatch.setenv("MAML_DATABASE_URL", "postgresql://maml@postgres:5432/maml")
    settings = Settings()
    assert settings.env == "production"
    assert settings.checkpoint_uri is not None and not settings.checkpoint_uri.startswith("file:")
    assert settings.storage_dir is not None
    assert settings.sqlalchemy_url.startswith("postgresql+psycopg://")


def test_one_image_for_the_api_and_the_ray_nodes() -> None:
    images = {where: container["image"] for where, container in _containers()}
    assert len(set(images.values())) == 1, f"the API and the Ray nodes run different images: {images}"
    assert not next(iter(images.values())).endswith(":latest"), "pin a tag: replicas and workers must match"


def test_the_api_runs_several_replicas_and_rolls_without_downtime() -> None:
    spec = _api_deployment()["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    container = spec["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    env = _env(container)
    assert env["MAML_ENV"]["value"] == "production"
    # A stopping replica gets longer than the service waits for its running jobs.
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > float(env["MAML_STOP_TIMEOUT_S"]["value"])


def test_the_service_selects_the_api_pods() -> None:
    service, deployment = _one("Service"), _api_deployment()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {port.get("name") for port in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    ports |= {port["containerPort"] for port in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert all(port["targetPort"] in ports for port in service["spec"]["ports"])


def test_pods_run_as_the_images_non_root_user() -> None:
    for where, spec in _pod_specs():
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] == 1000, where
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where


def test_secrets_are_referenced_not_inlined() -> None:
    assert not [doc for _, doc in DOCUMENTS if doc["kind"] == "Secret"], "no Secret objects in deploy/"
    env = _env(_api_deployment()["spec"]["template"]["spec"]["containers"][0])
    for variable in ("MAML_DATABASE_URL", "MAML_ADMIN_TOKEN", "RAY_AUTH_TOKEN"):
        assert "secretKeyRef" in env[variable]["valueFrom"], variable
    for where, container in _containers():
        for variable, entry in _env(container).items():
            if variable in SECRET_ENV or SECRET_WORDS.search(variable):
                assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], f"{where}: {variable} inlined"
    # Nor in an argument, or a URL with a password anywhere in the manifests' text (comments aside).
    for path in DEPLOY.glob("*.yaml"):
        text = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
        assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), f"{path.name}: credentials in a URL"


def test_ray_address_points_at_the_head_service() -> None:
    env = _env(_api_deployment()["spec"]["template"]["spec"]["containers"][0])
    host, _, port = env["MAML_RAY_ADDRESS"]["value"].removeprefix("ray://").partition(":")
    assert host == f"{_ray_cluster()['metadata']['name']}-head-svc"  # the Service KubeRay creates
    assert port.isdigit()


def test_storage_is_shared_by_every_replica_and_worker() -> None:
    claims = {doc["metadata"]["name"]: doc for _, doc in DOCUMENTS if doc["kind"] == "PersistentVolumeClaim"}
    api = _api_deployment()["spec"]["template"]["spec"]
    storage_dir = _env(api["containers"][0])["MAML_STORAGE_DIR"]["value"]
    checkpoint_uri = _env(api["containers"][0])["MAML_CHECKPOINT_URI"]["value"]
    assert re.match(r"(s3|gs|hdfs)://", checkpoint_uri), "checkpoints on object storage"

    def storage_claim(spec: dict[str, Any]) -> str:
        mounts = {mount["mountPath"]: mount["name"] for mount in spec["containers"][0]["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        assert storage_dir in mounts, "the storage volume is not mounted at MAML_STORAGE_DIR"
        return volumes[mounts[storage_dir]]["persistentVolumeClaim"]["claimName"]

    claim = storage_claim(api)
    assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"]
    # Sweep folders live there and Ray Tune's trials write them from the worker nodes, same path.
    for where, spec in _pod_specs():
        if where.startswith("ray workers"):
            assert storage_claim(spec) == claim, where
    # Every claim the pods use is defined in deploy/.
    used = {volume["persistentVolumeClaim"]["claimName"] for _, spec in _pod_specs()
            for volume in spec.get("volumes", []) if "persistentVolumeClaim" in volume}
    assert used <= claims.keys()


# -- the image ---------------------------------------------------------------------------------


def test_dockerfile_defaults_to_production_and_copies_every_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    arg = re.search(r"^ARG MAML_ENV=(\S+)$", text, re.MULTILINE)
    assert arg and arg.group(1) == "production"
    assert re.search(r"^\s*MAML_ENV=\$\{MAML_ENV\}", text, re.MULTILINE), "ENV MAML_ENV from the ARG"
    copied = {match.group(1) for match in re.finditer(r"^COPY (\w+) \./\1$", text, re.MULTILINE)}
    assert set(TOP_LEVEL_PACKAGES) == {"api", "service", "workers", "cli"} <= copied
    assert re.search(r"^USER maml$", text, re.MULTILINE) and "--uid 1000" in text
