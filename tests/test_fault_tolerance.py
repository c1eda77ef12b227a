"""Training survives faults: a SIGKILLed worker and an interrupted stage both resume from the last
checkpoint, and MLflow ends with exactly one run per training, every epoch logged once.

Real Ray (2 CPU workers, gloo), real MLflow (SQLite), real shards; the faults are real signals.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import (
    FAULT_EPOCHS,
    free_port,
    make_fault_study,
    mlflow_runs,
    ray_checkpoints,
    resumed_at,
    stop_process_tree,
    wait_for_checkpoint,
)

pytestmark = pytest.mark.slow


@pytest.fixture()
def study(tmp_path: Path, root: Path) -> Path:
    return make_fault_study(tmp_path, root)


def _start(repo: Path, tag: str, **extra_env: str) -> subprocess.Popen:
    env = {**os.environ, "STUDY_TEST_TAG": tag, "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    env.update(extra_env)
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train", "--variant", "tiny"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _workers(tag: str) -> list[psutil.Process]:
    """This test's Ray Train workers (they inherit the driver's environment through the raylet)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if (
                "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])
                and p.environ().get("STUDY_TEST_TAG") == tag
            ):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_a_killed_worker_resumes_from_its_checkpoint(study: Path) -> None:
    tag = uuid.uuid4().hex
    proc = _start(study, tag)
    wait_for_checkpoint(study, proc)
    before = ray_checkpoints(study)
    victims = _workers(tag)
    assert len(victims) == 2
    victims[-1].send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-6000:]
    [(run, steps)] = mlflow_runs(study)
    assert run.info.status == "FINISHED"
    assert steps == list(range(FAULT_EPOCHS)), "every epoch logged exactly once"
    # The restarted worker group started at a checkpoint's step, not at 0 (a restart from scratch
    # logs no resume at all), and no older than the checkpoints on disk before the kill. Not
    # necessarily the newest: one rank 0 persisted while the killed rank never reached the report
    # barrier is never registered, so Ray resumes from the one before.
    [resumed] = resumed_at(study, run)
    assert resumed != (0, 0) and resumed >= min(before), (resumed, before)


def test_an_interrupted_stage_resumes_on_rerun_and_a_params_change_starts_fresh(study: Path) -> None:
    tag = uuid.uuid4().hex
    proc = _start(study, tag)
    wait_for_checkpoint(study, proc)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C on `dvc repro` delivers
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    [(killed, _)] = mlflow_runs(study)
    assert killed.info.status == "KILLED"
    on_disk = ray_checkpoints(study)  # nothing writes any more: the re-run must start at one of these

    again = _start(study, tag)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-6000:]
    assert "resuming MLflow run" in out
    [(run, steps)] = mlflow_runs(study)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert steps == list(range(FAULT_EPOCHS))
    [resumed] = resumed_at(study, run)
    assert resumed in on_disk and resumed != (0, 0), "the re-run's first step is a checkpoint's"

    raw = yaml.safe_load((study / "params.yaml").read_text())
    raw["train"]["lr"] *= 2
    (study / "params.yaml").write_text(yaml.safe_dump(raw))
    fresh = _start(study, tag)
    out, _ = fresh.communicate(timeout=600)
    assert fresh.returncode == 0, out[-6000:]
    assert "resuming" not in out
    assert len(mlflow_runs(study)) == 2


def test_a_sigkilled_driver_is_resumed_by_the_rerun(study: Path) -> None:
    """SIGKILL gives the driver no chance to clean up: its MLflow run stays RUNNING and its lease
    (``<name>.lock``) stays behind. The re-run takes the lease over (its holder is dead, on this
    host), reopens the same run and resumes from a checkpoint."""
    tag = uuid.uuid4().hex
    proc = _start(study, tag)
    wait_for_checkpoint(study, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    for worker in _workers(tag):  # the killed driver's Ray workers die with its Ray instance, or here
        worker.kill()
    [(killed, _)] = mlflow_runs(study)
    assert killed.info.status == "RUNNING"
    assert list((study / "runs" / "ray").glob("*.lock")), "the dead driver's lease is still there"
    on_disk = ray_checkpoints(study)

    again = _start(study, tag)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-6000:]
    [(run, steps)] = mlflow_runs(study)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert steps == list(range(FAULT_EPOCHS))
    [resumed] = resumed_at(study, run)
    assert resumed in on_disk and resumed != (0, 0)
    assert not list((study / "runs" / "ray").glob("*.lock")), "released at the end"


class MlflowServer:
    """A real ``mlflow server`` (SQLite store, proxied artifacts) on a fixed port, stopped and
    started again on the same port and store, as a restarted tracking server would be."""

    def __init__(self, base: Path) -> None:
        self.base, self.port = base, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = f"sqlite:///{base / 'mlflow.db'}"  # read directly by the test, server up or not
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        mlflow = Path(sys.executable).parent / "mlflow"
        cmd = [str(mlflow), "server", "--backend-store-uri", self.store, "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--artifacts-destination", str(self.base / "artifacts")]
        log = open(self.base / "server.log", "a")  # noqa: SIM115 (the server's own, closed with it)
        self.proc = subprocess.Popen(cmd, cwd=self.base, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.base / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(
            f"mlflow server did not start:\n{(self.base / 'server.log').read_text()[-3000:]}"
        )

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_tree(self.proc)
            self.proc = None


@pytest.fixture()
def server(tmp_path: Path):
    (tmp_path / "server").mkdir()
    s = MlflowServer(tmp_path / "server")
    s.start()
    yield s
    s.stop()


def test_a_tracking_server_restarted_mid_run_gets_the_gap_logged_after(study: Path, server) -> None:
    """The server goes away after the first epoch and comes back 12 s later: rank 0's logging waits
    (MLflow's HTTP retries) and the training goes on; the run ends FINISHED with every epoch once."""
    tag = uuid.uuid4().hex
    proc = _start(study, tag, MLFLOW_TRACKING_URI=server.url)
    try:
        wait_for_checkpoint(study, proc, store=server.store)
        server.stop()
        time.sleep(12)  # training goes on; the epochs it logs meanwhile wait in MLflow's retries
        server.start()
        out, _ = proc.communicate(timeout=600)
    finally:
        stop_process_tree(proc)
    assert proc.returncode == 0, out[-6000:]
    [(run, steps)] = mlflow_runs(study, server.store)
    assert run.info.status == "FINISHED"
    assert steps == list(range(FAULT_EPOCHS))  # the gap's epochs logged after, none twice
    assert not (study / "mlflow.db").exists()  # everything went to the server


def test_a_tracking_server_gone_fails_the_stage_naming_it_and_keeps_the_checkpoint(
    study: Path, server
) -> None:
    """The server goes away for good (no retries): the stage fails naming the server, the Ray
    checkpoints stay, and once the server is back the re-run resumes the same run from them."""
    params = yaml.safe_load((study / "params.yaml").read_text())
    params["train"]["max_failures"] = 0  # no worker-group restarts that would only fail the same way
    (study / "params.yaml").write_text(yaml.safe_dump(params))
    tag = uuid.uuid4().hex
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    proc = _start(study, tag, MLFLOW_TRACKING_URI=server.url, **quick)
    try:
        wait_for_checkpoint(study, proc, store=server.store)
        server.stop()
        out, _ = proc.communicate(timeout=600)
    finally:
        stop_process_tree(proc)
    assert proc.returncode != 0, out[-6000:]
    assert f"127.0.0.1:{server.port}" in out, out[-6000:]
    on_disk = ray_checkpoints(study)
    assert on_disk, "the checkpoints are kept"
    [(first, _)] = mlflow_runs(study, server.store)

    server.start()
    again = _start(study, tag, MLFLOW_TRACKING_URI=server.url)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-6000:]
    [(run, steps)] = mlflow_runs(study, server.store)
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert steps == list(range(FAULT_EPOCHS))
    assert resumed_at(study, run, server.store)[-1] in on_disk
