"""The Kubernetes manifest (deploy/k8s/ds-qwen-vision.yaml): valid against the Kubernetes API schemas
(kubernetes-validate bundles them, strict: an unknown or misspelt field fails), and consistent with the
deployment config it runs -- the shipped config file with the container's args applied, read the way
launch.sh reads it.

The rules between fields (``manifest_problems``), each of which a mutated manifest must trip:
GPUs requested = tensor_parallel.tp_size; readiness = GET /health on the port the front binds; no liveness
probe on /health (a loading or draining replica is alive); terminationGracePeriodSeconds above the preStop
sleep plus server.shutdown_grace_s; the front bound to all interfaces; the API key's env var set; the
Service aimed at the pods' port; a /dev/shm larger than the runtime's default.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from ds_qwen_vision.config import DeployConfig, add_cli_args, load_config

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "deploy" / "k8s" / "ds-qwen-vision.yaml"
IMAGE_ROOT = "/opt/ds-qwen-vision/"  # where the image holds the project (the manifest's comment says so)
# The oldest Kubernetes the manifest is meant for (preStop's sleep action is 1.30's), and the newest schemas.
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def load_docs(path: Path = MANIFEST) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs)
    return by_kind


@pytest.mark.parametrize("version", VERSIONS)
def test_the_manifest_validates_against_the_kubernetes_schemas(version):
    docs = load_docs()
    assert set(docs) == {"Deployment", "Service"}
    for doc in docs.values():
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError


def test_the_schema_check_catches_a_misspelt_field():
    deployment = copy.deepcopy(load_docs()["Deployment"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/health"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def container_config(container: dict) -> DeployConfig:
    """The config launch.sh would run in this container: its --config file (from the repo) and overrides."""
    assert container["command"] == [IMAGE_ROOT + "launch.sh"], container["command"]
    ns = add_cli_args(argparse.ArgumentParser()).parse_args(container["args"])
    assert ns.config.startswith(IMAGE_ROOT), ns.config
    path = REPO / ns.config.removeprefix(IMAGE_ROOT)
    return load_config(str(path), {k: getattr(ns, k) for k in ("model", "host", "port", "tp", "gpus", "device",
                                                               "dtype")}, check_env=False)


def manifest_problems(docs: dict[str, dict]) -> list[str]:
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    cfg = container_config(c)
    problems = []
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}

    def port_of(ref) -> int | None:
        return ports.get(ref) if isinstance(ref, str) else ref

    for kind in ("limits", "requests"):
        gpus = c.get("resources", {}).get(kind, {}).get("nvidia.com/gpu")
        if gpus != cfg.tensor_parallel.tp_size:
            problems.append(f"resources.{kind} nvidia.com/gpu {gpus} != tensor_parallel.tp_size "
                            f"{cfg.tensor_parallel.tp_size}")
    if cfg.device != "cuda":
        problems.append(f"device {cfg.device}: the pod asks for GPUs")
    if cfg.tensor_parallel.gpus is not None:
        problems.append("tensor_parallel.gpus is set: in a pod the device plugin picks the GPUs")
    ready = c.get("readinessProbe", {}).get("httpGet", {})
    if ready.get("path") != "/health" or port_of(ready.get("port")) != cfg.server.port:
        problems.append(f"readinessProbe {ready} is not GET /health on server.port {cfg.server.port}")
    live = c.get("livenessProbe", {}).get("httpGet", {})
    if live.get("path") == "/health":
        problems.append("livenessProbe on /health would restart replicas that are loading or draining")
    if cfg.server.host not in ("0.0.0.0", "::"):
        problems.append(f"server.host {cfg.server.host}: probes and the Service cannot reach it")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    if grace <= pre_stop + cfg.server.shutdown_grace_s:
        problems.append(f"terminationGracePeriodSeconds {grace} <= preStop sleep {pre_stop} + "
                        f"server.shutdown_grace_s {cfg.server.shutdown_grace_s:g}: SIGKILL before the drain ends")
    env = {e["name"] for e in c.get("env", [])}
    if cfg.security.api_key_env is not None and cfg.security.api_key_env not in env:
        problems.append(f"security.api_key_env {cfg.security.api_key_env} is not in the container's env")
    service = docs["Service"]["spec"]
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    if not service["selector"].items() <= labels.items():
        problems.append(f"Service selector {service['selector']} does not match the pods' labels {labels}")
    if any(port_of(p.get("targetPort")) != cfg.server.port for p in service["ports"]):
        problems.append(f"Service targetPort is not server.port {cfg.server.port}")
    shm = [v for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
    if not any(mounts.get(v["name"]) == "/dev/shm" for v in shm):
        problems.append("no memory-backed /dev/shm: NCCL's buffers do not fit the runtime's 64 MiB")
    return problems


def test_the_manifest_agrees_with_the_config_it_runs():
    docs = load_docs()
    assert manifest_problems(docs) == []
    cfg = container_config(docs["Deployment"]["spec"]["template"]["spec"]["containers"][0])
    assert (cfg.model, cfg.tensor_parallel.tp_size, cfg.server.shutdown_grace_s) == ("/models/Qwen3.6-27B", 2, 30)


def mutate(path: str, value):
    docs = copy.deepcopy(load_docs())
    node = docs
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is None:
        del node[leaf]
    else:
        node[leaf] = value
    return docs


C = "Deployment.spec.template.spec.containers.0"


@pytest.mark.parametrize("path, value, expected", [
    (f"{C}.resources.limits", {"nvidia.com/gpu": 1}, "resources.limits nvidia.com/gpu 1 != tensor_parallel.tp_size 2"),
    (f"{C}.args", ["--config", IMAGE_ROOT + "ds_config/qwen3.6-27b-2gpu.json", "--host", "0.0.0.0", "--tp", "4"],
     "nvidia.com/gpu 2 != tensor_parallel.tp_size 4"),
    (f"{C}.readinessProbe", {"httpGet": {"path": "/health", "port": 8080}}, "is not GET /health on server.port"),
    (f"{C}.livenessProbe", {"httpGet": {"path": "/health", "port": "http"}}, "livenessProbe on /health"),
    (f"{C}.args", ["--config", IMAGE_ROOT + "ds_config/qwen3.6-27b-2gpu.json"], "server.host 127.0.0.1"),
    ("Deployment.spec.template.spec.terminationGracePeriodSeconds", 30,
     "terminationGracePeriodSeconds 30 <= preStop sleep 5 + server.shutdown_grace_s 30"),
    (f"{C}.env", None, "security.api_key_env DSQV_API_KEY is not in the container's env"),
    ("Service.spec.ports", [{"port": 80, "targetPort": 9000}], "Service targetPort is not server.port 8000"),
    ("Service.spec.selector", {"app": "other"}, "does not match the pods' labels"),
    (f"{C}.volumeMounts", [{"name": "models", "mountPath": "/models"}], "no memory-backed /dev/shm"),
])
def test_each_cross_field_rule_can_fail(path, value, expected):
    problems = manifest_problems(mutate(path, value))
    assert any(expected in p for p in problems), problems
