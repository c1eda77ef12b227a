"""The cluster path, for real: a Ray head and an MLflow server on 127.0.0.1, the miniature study
submitted through ``python -m pipeline.submit`` (the documented command), nothing mocked.

The head and the server are started once for the module, each in its own session, and stopped by
process id at the end (never ``ray stop``: it kills every Ray process on the machine). A fast test
first checks the state round trip the jobs rely on, with real DVC on a two-stage toy project.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers import copy_worktree, free_ports, stop_process_tree

BIN = Path(sys.executable).parent


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[:3]} exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout} s:\n{log.read_text()[-4000:]}")


@dataclass
class Cluster:
    dashboard: str
    mlflow: str
    shared: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # A short base path: Ray's unix sockets live under its temp dir (108-byte limit).
    base = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    home, shared = base / "home", base / "shared"
    home.mkdir()
    shared.mkdir()
    gcs, dash, client_port, agent = free_ports(4)
    mlflow_port = free_ports(1)[0]
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",  # explicit: a token left in ~/.ray would switch it on
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no background job runners on 2 cores
    }
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    ray_log, mlflow_log = base / "ray.log", base / "mlflow.log"
    procs: list[subprocess.Popen] = []
    try:
        with open(ray_log, "w") as rl, open(mlflow_log, "w") as ml:
            ray_head = subprocess.Popen(
                [
                    str(BIN / "ray"),
                    "start",
                    "--head",
                    "--block",
                    "--node-ip-address=127.0.0.1",
                    "--dashboard-host=127.0.0.1",
                    f"--port={gcs}",
                    f"--dashboard-port={dash}",
                    f"--ray-client-server-port={client_port}",
                    f"--dashboard-agent-listen-port={agent}",
                    "--num-cpus=2",
                    "--disable-usage-stats",
                    f"--temp-dir={base / 'ray'}",
                ],
                env=env,
                stdout=rl,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            procs.append(ray_head)
            server = subprocess.Popen(
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--backend-store-uri",
                    f"sqlite:///{base / 'mlflow.db'}",
                    "--artifacts-destination",
                    str(base / "mlartifacts"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(mlflow_port),
                    "--workers",
                    "1",
                ],
                env=env,
                stdout=ml,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            procs.append(server)
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", server, mlflow_log)
        _wait_http(f"http://127.0.0.1:{dash}/api/version", ray_head, ray_log)
        yield Cluster(f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{mlflow_port}", shared, env)
    finally:
        for proc in procs:
            stop_process_tree(proc)
        shutil.rmtree(base, ignore_errors=True)


def _dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


TOY_DVC = """
stages:
  make:
    cmd: mkdir -p data/out && echo a > data/out/a.txt
    outs: [data/out]
  summarize:
    cmd: mkdir -p results && echo {} > results/r.json
    deps: [data/out]
    params: [x]
    outs:
      - results/r.json:
          cache: false
"""


def test_state_round_trip_skips_unchanged_stages_and_leaves_local_dvc_up_to_date(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from pipeline.cluster import private_copy, repro
    from pipeline.state import fetch_state, restore_state, save_state

    src = tmp_path / "src"
    src.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=src, check=True)
    _dvc(src, "init", "-q")
    (src / "dvc.yaml").write_text(TOY_DVC)
    (src / "params.yaml").write_text("x: 1\n")
    output = str(tmp_path / "shared" / "state")

    # Job 1: nothing to restore, both stages run, the state is saved.
    first = private_copy(src)
    request.addfinalizer(lambda: shutil.rmtree(first.parent, ignore_errors=True))
    assert restore_state(output, first) == []
    assert repro(first, []) == (0, ["make", "summarize"])
    assert set(save_state(first, output)) == {"dvc.lock", "params.yaml", "data/out", "results/r.json"}

    # Job 2, same tree: the restored lock, outputs and cache leave DVC nothing to do.
    second = private_copy(src)
    request.addfinalizer(lambda: shutil.rmtree(second.parent, ignore_errors=True))
    assert "data/out" in restore_state(output, second)
    assert repro(second, []) == (0, [])

    # The fetch makes the submitting checkout's DVC see the pipeline as run.
    assert set(fetch_state(output, src, src / ".dvc" / "cache")) == {"dvc.lock", "data/out", "results/r.json"}
    assert "up to date" in _dvc(src, "status")

    # A params change since submission: the fetch refuses to overwrite dvc.lock.
    (src / "params.yaml").write_text("x: 2\n")
    with pytest.raises(RuntimeError, match="differs from the params the job ran with"):
        fetch_state(output, src, src / ".dvc" / "cache")


def test_submit_refuses_checkpoints_in_the_jobs_throwaway_copy(root: Path, tmp_path: Path) -> None:
    """Before any upload: a relative train.storage_path would vanish with the job."""
    shutil.copy2(root / "profiles" / "mini.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    env = {**os.environ, "PYTHONPATH": str(root), "RAY_AUTH_MODE": "disabled"}
    cmd = [
        sys.executable,
        "-m",
        "pipeline.submit",
        "--address",
        "http://127.0.0.1:9",
        "--output",
        str(tmp_path),
    ]
    proc = subprocess.run(
        [*cmd, "--mlflow-uri", "http://127.0.0.1:9"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "train.storage_path" in proc.stderr and "is relative" in proc.stderr, proc.stderr
    assert "submitted" not in proc.stderr


def _copy_repo(root: Path, dest: Path, params: dict) -> Path:
    """The tracked and untracked-but-not-ignored files, committed, with the given params.yaml."""
    copy_worktree(root, dest)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / "dvc.lock").unlink(missing_ok=True)
    git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run([*git, *cmd], cwd=dest, check=True, capture_output=True)
    return dest


def _mini(root: Path, shared: Path) -> dict:
    params = yaml.safe_load((root / "profiles" / "mini.yaml").read_text())
    params["train"]["storage_path"] = str(shared / "checkpoints")  # shared storage, as on a cluster
    params["data"]["shards"]["output"] = str(shared / "shards")
    return params


def _submit(repo: Path, c: Cluster, output: Path, *extra: str, timeout: float = 1200):
    cmd = [
        sys.executable,
        "-m",
        "pipeline.submit",
        "--address",
        c.dashboard,
        "--mlflow-uri",
        c.mlflow,
        "--output",
        str(output),
        "--poll",
        "2",
        *extra,
    ]
    tic = time.monotonic()
    proc = subprocess.run(cmd, cwd=repo, env=c.env, capture_output=True, text=True, timeout=timeout)
    return proc, proc.stdout + proc.stderr, time.monotonic() - tic


def _job_id(out: str) -> str:
    match = re.search(r"submitted job (\S+)", out)
    assert match, out
    return match.group(1)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(1800)  # the mini study is 3 variants and a Ray Tune stage; 12 min on a loaded 2-core box
def test_submitted_study_runs_on_the_cluster_and_lands_in_shared_storage(
    root: Path, cluster: Cluster, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    params = _mini(root, cluster.shared)
    variants = list(params["variants"])
    repo = _copy_repo(root, tmp_path / "repo", params)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout
    output = cluster.shared / "study"

    proc, out, seconds = _submit(repo, cluster, output)
    assert proc.returncode == 0, out
    job_id = _job_id(out)
    assert f"{cluster.dashboard}/#/jobs/{job_id}" in out and "SUCCEEDED" in out, out
    jobs = JobSubmissionClient(cluster.dashboard)
    assert jobs.get_job_status(job_id) == JobStatus.SUCCEEDED
    log = jobs.get_job_logs(job_id)
    assert {f"train@{v}" for v in variants} <= set(re.findall(r"Running stage '([^']+)'", log)), log[-3000:]

    # One finished MLflow run per variant on the shared server, tagged with the submitter's commit.
    client = MlflowClient(cluster.mlflow)
    experiment = client.get_experiment_by_name(params["tracking"]["experiment"])
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.dvc_stage LIKE 'train@%'")
    assert sorted(r.data.tags["variant"] for r in runs) == sorted(variants)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["git_commit"] == commit.strip()
        assert run.data.tags["ray_submission_id"] == job_id
        assert len(client.get_metric_history(run.info.run_id, "val_top1")) == params["train"]["epochs"]

    # The report, metrics and lock file are in the shared output location; checkpoints in shared storage.
    md = (output / "reports" / "comparison.md").read_text()
    assert all(f"| {v} |" in md for v in variants), md
    assert all((output / "results" / f"{v}.json").is_file() for v in variants)
    record = json.loads((output / "job.json").read_text())
    assert record["submission_id"] == job_id and record["dvc_repro_exit_code"] == 0
    assert len(list((cluster.shared / "checkpoints").glob("*/checkpoint_*"))) >= len(variants)

    # ... and were fetched back: the local DVC sees the pipeline the cluster ran as up to date.
    assert (repo / "reports" / "comparison.md").read_text() == md
    status = subprocess.run(
        [str(BIN / "dvc"), "status"], cwd=repo, env=cluster.env, capture_output=True, text=True
    )
    assert "up to date" in status.stdout, status.stdout + status.stderr

    # Resubmitting the unchanged study restores its state from the output location: no stage runs.
    again, out2, seconds2 = _submit(repo, cluster, output, "--follow")
    assert again.returncode == 0, out2
    assert "Running stage" not in out2 and "didn't change" in out2, out2
    print(f"study job {seconds:.0f} s, no-op resubmission {seconds2:.0f} s")


@pytest.mark.slow
def test_failing_job_exits_nonzero_and_prints_the_log_tail(
    root: Path, cluster: Cluster, tmp_path: Path
) -> None:
    params = _mini(root, cluster.shared)
    missing = tmp_path / "no-such-imagenet"
    params["data"].update(source="folder", root=str(missing))
    repo = _copy_repo(root, tmp_path / "repo", params)

    proc, out, seconds = _submit(repo, cluster, cluster.shared / "broken", timeout=240)
    assert proc.returncode == 1, out
    assert "FAILED" in out and "last 80 lines" in out, out
    tail = out.split("last 80 lines", 1)[1]
    assert str(missing) in tail, out
    assert not (repo / "dvc.lock").exists()  # nothing fetched from a failed job
    print(f"failing job {seconds:.0f} s")
