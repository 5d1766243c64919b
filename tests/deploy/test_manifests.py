"""The compose file and Kubernetes manifests are valid and agree with the service's settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from genstruct_service.config import Settings
from genstruct_service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
K8S = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
DEFAULTS = Settings()
GRPC_PORT, METRICS_PORT = DEFAULTS.port, DEFAULTS.metrics_port
KUBERNETES_VERSION = "1.31.0"
NATIVE_SIDECARS = "1.29.0"  # the first version with init containers of restartPolicy Always


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in K8S:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (name, doc["spec"]["template"]["spec"])
        for name, doc in documents()
        if doc["kind"] in {"Deployment", "Job"}
    ]


def genstruct_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """The server's containers, native sidecars (init containers) included."""
    return [
        (name, spec, container)
        for name, spec in pod_specs()
        for container in [*spec.get("initContainers", []), *spec["containers"]]
        if container["name"] == "genstruct"
    ]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


@pytest.mark.parametrize("name, doc", documents(), ids=[n for n, _ in documents()])
def test_manifest_validates_against_the_kubernetes_schema(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_kind_of_deployment_is_there() -> None:
    kinds = {doc["kind"] for _, doc in documents()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds
    assert len(genstruct_containers()) == 3  # the sidecar Pod, the replicas, the sharded Job


def test_pods_run_as_non_root() -> None:
    for name, spec in pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name


def test_ports_agree_with_the_settings_and_probes_hit_grpc() -> None:
    for name, _, container in genstruct_containers():
        args = container["args"]
        assert flag(args, "--port") == str(GRPC_PORT), name
        assert flag(args, "--metrics-port") == str(METRICS_PORT), name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            check = container[probe]
            if "grpc" in check:
                assert check["grpc"]["port"] == GRPC_PORT, (name, probe)
            else:
                command = check["exec"]["command"]
                assert command[:2] == ["genstruct", "health"], (name, probe)
                assert flag(command, "--target") == f"127.0.0.1:{GRPC_PORT}", (name, probe)


def test_grace_period_outlasts_the_drain() -> None:
    for name, spec, container in genstruct_containers():
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        drain = float(env.get("GENSTRUCT_DRAIN_SECONDS", DEFAULTS.drain_seconds))
        assert spec["terminationGracePeriodSeconds"] > drain, name


def test_sidecar_stays_on_loopback_and_replicas_bind_all() -> None:
    binds = {name.split(":")[0]: flag(c["args"], "--host") for name, _, c in genstruct_containers()}
    assert binds == {
        "sidecar.yaml": "127.0.0.1",
        "replicas.yaml": "0.0.0.0",
        "bulk-job.yaml": "127.0.0.1",
    }


def test_replicas_are_behind_a_headless_service_with_round_robin_clients() -> None:
    docs = dict(documents())
    service = docs["replicas.yaml:Service/genstruct"]
    assert service["spec"]["clusterIP"] == "None"
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["port"] == GRPC_PORT
    job = docs["replicas.yaml:Job/genstruct-bulk"]
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert flag(args, "--target").startswith("dns:///")  # type: ignore[union-attr]


def test_replicas_request_a_gpu() -> None:
    for name, _, container in genstruct_containers():
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, name


def test_autoscaler_targets_the_replicas_on_a_served_metric() -> None:
    docs = dict(documents())
    hpa = docs["hpa.yaml:HorizontalPodAutoscaler/genstruct"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "genstruct"
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    exposed = {family.name for family in Metrics().registry.collect()}
    assert metric in exposed


def test_compose_runs_the_app_as_a_sidecar() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    service, app = compose["services"]["genstruct"], compose["services"]["app"]
    assert app["network_mode"] == "service:genstruct"
    assert flag(service["command"], "--host") == "127.0.0.1"
    assert flag(service["command"], "--port") == str(GRPC_PORT)
    assert flag(app["command"], "--target") == f"127.0.0.1:{GRPC_PORT}"
    assert service["healthcheck"]["test"][1:3] == ["genstruct", "health"]
    assert (ROOT / "deploy" / service["build"]["context"] / "Dockerfile").is_file()
    for volume in app["volumes"]:
        assert (ROOT / "deploy" / volume.split(":")[0]).is_dir(), volume


def test_sharded_job_validates_where_native_sidecars_exist() -> None:
    job = dict(documents())["bulk-job.yaml:Job/genstruct-sharded"]
    kubernetes_validate.validate(job, NATIVE_SIDECARS, strict=True)


def test_sharded_job_runs_the_server_as_a_native_sidecar_and_a_shard_per_index() -> None:
    job = dict(documents())["bulk-job.yaml:Job/genstruct-sharded"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] <= spec["completions"]
    pod = spec["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    assert sidecar["name"] == "genstruct" and sidecar["restartPolicy"] == "Always"
    probe = sidecar["startupProbe"]
    # gRPC health: the kubelet's probe on the port, or `genstruct health` on loopback.
    assert probe.get("grpc", {}).get("port") == GRPC_PORT or probe["exec"]["command"][:2] == [
        "genstruct",
        "health",
    ]
    (main,) = pod["containers"]
    args = main["command"] + main["args"]
    assert args[:2] == ["genstruct", "generate"]
    assert flag(args, "--target") == f"127.0.0.1:{GRPC_PORT}"
    env = {e["name"]: e.get("value") for e in main.get("env", [])}
    if "--shard" not in args:  # the shard from JOB_COMPLETION_INDEX, its count given
        assert env["GENSTRUCT_SHARDS"] == str(spec["completions"])
        assert "{shard}" in flag(args, "-o")  # type: ignore[operator]
    # A failed shard is retried alone; a usage error (exit 2) is not retried.
    assert pod["restartPolicy"] == "Never" and spec["backoffLimitPerIndex"] >= 1
    (fail_index,) = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailIndex"]
    assert fail_index["onExitCodes"] == {
        "containerName": main["name"], "operator": "In", "values": [2]
    }
    mounted = {m["name"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert any("persistentVolumeClaim" in volumes[name] for name in mounted)
