"""docker-compose.yml and the Kubernetes manifests under deploy/k8s: they parse, reference what
exists, and every service command they hold is accepted by that service's own flag parser."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from lego import metrics
from lego.service_main import base_parser

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
NAMESPACE = "legodiffusion"
API_VERSIONS = {
    "Namespace": "v1",
    "ConfigMap": "v1",
    "Service": "v1",
    "StatefulSet": "apps/v1",
    "Deployment": "apps/v1",
    "Job": "batch/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
}
WORKLOADS = {"Deployment", "StatefulSet", "Job"}
LEGO_SERVICES = {"lego_gateway", "lego_compiler", "lego_coordinator", "lego_worker", "lego_dataengine"}


def manifests() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            assert isinstance(document, dict), f"{path.name}: a document is not a mapping"
            documents.append(document)
    return documents


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in manifests() if d["kind"] == kind]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def config() -> dict[str, str]:
    (configmap,) = by_kind("ConfigMap")
    data: dict[str, str] = configmap["data"]
    return data


def accepts(command: list[str]) -> None:
    """`python -m lego_X flags…`: the service's own parser takes the flags (SystemExit 2 if not)."""
    assert command[:2] == ["python", "-m"], command
    module = importlib.import_module(f"{command[2]}.__main__")
    parsed: list[object] = []

    def parse_only(name: str, start: object, argv: list[str] | None = None, parser: Any = None) -> int:
        parsed.append((parser or base_parser(name)).parse_args(argv))
        return 0

    original = module.run_service
    module.run_service = parse_only
    try:
        assert module.main(command[3:]) == 0
    finally:
        module.run_service = original
    assert parsed


# ---- Kubernetes ----


def test_every_manifest_has_the_required_fields() -> None:
    documents = manifests()
    assert {d["kind"] for d in documents} == set(API_VERSIONS)
    names = set()
    for document in documents:
        kind, metadata = document["kind"], document["metadata"]
        assert document["apiVersion"] == API_VERSIONS[kind], kind
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", metadata["name"]), metadata["name"]
        if kind != "Namespace":
            assert metadata["namespace"] == NAMESPACE, metadata["name"]
        assert metadata["labels"]["app.kubernetes.io/part-of"] == NAMESPACE
        assert (kind, metadata["name"]) not in names, f"duplicate {kind} {metadata['name']}"
        names.add((kind, metadata["name"]))


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


def test_workloads_select_their_pods_and_containers_are_complete() -> None:
    settings = config()
    for workload in [d for d in manifests() if d["kind"] in WORKLOADS]:
        name = workload["metadata"]["name"]
        template_labels = workload["spec"]["template"]["metadata"]["labels"]
        if workload["kind"] != "Job":
            selector = workload["spec"]["selector"]["matchLabels"]
            assert selector.items() <= template_labels.items(), name
        assert pod_spec(workload)["securityContext"]["runAsNonRoot"] is True, name
        for container in containers(workload):
            assert container["image"], name
            assert container.get("args") or container.get("command"), name
            assert container["resources"]["requests"], f"{name}/{container['name']}"
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe in container:
                    check = next(v for k, v in container[probe].items() if k in ("grpc", "httpGet"))
                    port = check["port"]
                    assert port in ports or port in ports.values(), f"{name}/{container['name']} {probe}"
            defined = set(settings) | {e["name"] for e in container.get("env", [])}
            for arg in container.get("args", []):
                for variable in re.findall(r"\$\((\w+)\)", arg):
                    assert variable in defined, f"{name}: $({variable}) is not defined"
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] == "lego-config"


def test_service_commands_are_accepted_by_the_services() -> None:
    settings = config()
    seen = set()
    for workload in [d for d in manifests() if d["kind"] in WORKLOADS]:
        for container in containers(workload):
            args = [
                re.sub(r"\$\((\w+)\)", lambda m: settings[m.group(1)], a) for a in container.get("args", [])
            ]
            if args[:2] == ["python", "-m"]:
                accepts(args)
                seen.add(args[2])
    assert seen == LEGO_SERVICES


def test_services_route_to_named_ports_of_selected_pods() -> None:
    workloads = [d for d in manifests() if d["kind"] in WORKLOADS]
    for service in by_kind("Service"):
        selector = service["spec"]["selector"]
        selected = [
            w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert selected, f"service {service['metadata']['name']} selects no pods"
        named = {p["name"] for w in selected for c in containers(w) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named, f"{service['metadata']['name']}: {port['targetPort']}"


def test_workers_request_a_gpu_drain_in_time_and_autoscale_on_queue_depth() -> None:
    (worker,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "lego-worker"]
    (main,) = pod_spec(worker)["containers"]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod_spec(worker)["terminationGracePeriodSeconds"] > float(config()["LEGO_DRAIN_TIMEOUT_S"])
    sidecar = pod_spec(worker)["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: stops after the worker drained
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "lego-worker",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["external"]["metric"]["name"] == metrics.QUEUE_DEPTH_TOTAL._name
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (coordinators,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "lego-coordinator"]
    assert coordinators["spec"]["replicas"] == 2
    (etcd,) = by_kind("StatefulSet")
    assert etcd["spec"]["serviceName"] == "lego-etcd"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_builds_the_manifests() -> None:
    built = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True)
    assert len(list(yaml.safe_load_all(built.stdout))) == len(manifests())


@pytest.mark.skipif(shutil.which("kubeconform") is None, reason="kubeconform is not installed")
def test_kubeconform_accepts_the_manifests() -> None:  # pragma: no cover - where it is installed
    files = [str(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"]
    subprocess.run(["kubeconform", "-strict", "-summary", *files], check=True)


# ---- docker compose ----


def interpolate(text: str) -> str:
    """Compose's ${VAR:-default} with nothing set: the defaults."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: interpolate(m.group(2)), text)


def compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_file_has_every_service_on_host_networking() -> None:
    compose = yaml.safe_load(interpolate(COMPOSE.read_text()))
    services = compose["services"]
    assert {
        "etcd",
        "compiler",
        "coordinator",
        "coordinator-standby",
        "dataengine",
        "gateway",
        "worker",
    } <= set(services)
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        assert "ports" not in service, name  # host networking publishes nothing
        assert "healthcheck" in service, name
    worker = services["worker"]
    assert "--port=0" in worker["command"]  # any number of workers fits on the host network
    drain = next(float(a.split("=")[1]) for a in worker["command"] if a.startswith("--drain-timeout-s="))
    grace = int(worker["stop_grace_period"].removesuffix("s"))
    assert grace > drain
    commands = [s["command"] for s in services.values() if s["command"][:2] == ["python", "-m"]]
    for command in commands:
        accepts(command)
    assert {c[2] for c in commands} == LEGO_SERVICES


def test_compose_file_validates_and_ports_are_configurable(tmp_path: Path) -> None:
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose here (scripts/ensure-compose installs one)")
    env_file = tmp_path / ".env"
    env_file.write_text("LEGO_GATEWAY_PORT=61051\nLEGO_ETCD_PORT=62379\n")
    result = subprocess.run(
        [
            *command,
            "-f",
            str(COMPOSE),
            "--project-directory",
            str(ROOT),
            "--env-file",
            str(env_file),
            "config",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert "--port=61051" in rendered["services"]["gateway"]["command"]
    assert "--store=etcd://127.0.0.1:62379" in rendered["services"]["worker"]["command"]
