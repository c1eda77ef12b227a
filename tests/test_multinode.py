"""A two-node Ray cluster on this machine, with token authentication on, and the faults a real
cluster meets: a node's raylet killed mid-epoch, and the dashboard connection of a waiting
``pipeline.submit`` dropped.

The head (``ray start --head``, 1 CPU) and a worker node (``ray start --address``, 1 CPU, its
own ports) each run in their own session under a temporary HOME; training uses 2 Ray Train
workers placed STRICT_SPREAD, so one rank runs on each node. Everything is stopped by process
id (never ``ray stop``: it would kill every Ray process on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import (
    FAULT_EPOCHS,
    free_ports,
    make_fault_study,
    mlflow_runs,
    ray_checkpoints,
    resumed_at,
    stop_process_tree,
    wait_for_checkpoint,
)

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Nodes:
    base: Path
    gcs: int
    dashboard: str
    token: str
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def get(self, path: str, *, auth: bool = True) -> tuple[int, bytes]:
        request = urllib.request.Request(self.dashboard + path)
        if auth:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except OSError:  # not listening (yet)
            return 0, b""

    def alive_nodes(self) -> int:
        status, body = self.get("/api/v0/nodes?detail=false&limit=100")
        if status != 200:
            return 0
        return sum(n["state"] == "ALIVE" for n in json.loads(body)["data"]["result"]["result"])

    def add_worker(self) -> subprocess.Popen:
        agent, grpc, metrics, runtime_env = free_ports(4)
        proc = subprocess.Popen(
            [
                str(BIN / "ray"), "start", "--block", f"--address=127.0.0.1:{self.gcs}",
                "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
                f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
            ],
            env=self.env, stdout=open(self.base / f"worker-{agent}.log", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def wait_for_nodes(self, n: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while self.alive_nodes() != n:
            assert time.monotonic() < deadline, f"{self.alive_nodes()} nodes alive, not {n}"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    base = Path(tempfile.mkdtemp(prefix="mn", dir="/tmp"))  # short: Ray's socket paths
    (base / "home").mkdir()
    gcs, dash, client, agent, grpc, metrics, runtime_env = free_ports(7)
    token = secrets.token_hex(32)
    env = {
        **os.environ,
        "HOME": str(base / "home"),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
        # Notice a dead node in seconds, not the default half minute.
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    }
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    cluster = Nodes(base, gcs, f"http://127.0.0.1:{dash}", token, env)
    head = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={grpc}", f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}", "--num-cpus=1", "--disable-usage-stats",
            f"--temp-dir={base / 'ray'}",
        ],
        env=env, stdout=open(base / "head.log", "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    cluster.procs.append(head)
    try:
        deadline = time.monotonic() + 90
        while cluster.get("/api/version")[0] != 200:
            assert head.poll() is None, (base / "head.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the head's dashboard did not answer"
            time.sleep(0.5)
        cluster.add_worker()
        cluster.wait_for_nodes(2)
        yield cluster
    finally:
        for proc in reversed(cluster.procs):
            stop_process_tree(proc)
        shutil.rmtree(base, ignore_errors=True)


def test_the_cluster_refuses_requests_without_the_token(nodes: Nodes) -> None:
    assert nodes.get("/api/jobs/", auth=False)[0] == 401
    wrong = Nodes(nodes.base, nodes.gcs, nodes.dashboard, "x" * 64, nodes.env)
    assert wrong.get("/api/jobs/")[0] == 403
    assert nodes.get("/api/jobs/")[0] == 200


@pytest.fixture()
def spread_study(tmp_path: Path, root: Path) -> Path:
    """The fault tests' miniature study, its 2 ranks forced onto different nodes."""
    repo = make_fault_study(tmp_path, root)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["train"].update(
        num_workers=2, cpus_per_worker=1, placement_strategy="STRICT_SPREAD", epochs=FAULT_EPOCHS
    )
    raw["train"]["storage_path"] = str(repo / "runs" / "ray")  # the same folder on both nodes
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    return repo


def _raylet_of(proc: subprocess.Popen) -> psutil.Process:
    [raylet] = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "raylet"]
    return raylet


@pytest.mark.timeout(420)
def test_a_killed_node_costs_only_the_steps_since_the_last_checkpoint(
    nodes: Nodes, spread_study: Path
) -> None:
    env = {
        **nodes.env,
        "RAY_ADDRESS": f"127.0.0.1:{nodes.gcs}",
        "PYTHONPATH": str(ROOT),
        "STUDY_TEST_TAG": uuid.uuid4().hex,
    }
    driver = subprocess.Popen(
        [sys.executable, "-m", "stages.train", "--variant", "tiny"],
        cwd=spread_study, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(driver.stdout), daemon=True)
    reader.start()
    try:
        wait_for_checkpoint(spread_study, driver)
        before = ray_checkpoints(spread_study)
        second = next(p for p in nodes.procs[1:] if p.poll() is None)
        # The node is lost: its raylet and the workers it started (a worker outlives its raylet for a
        # while, still computing, which no lost machine does).
        raylet = _raylet_of(second)
        for process in [raylet, *raylet.children(recursive=True)]:
            process.send_signal(signal.SIGKILL)
        nodes.wait_for_nodes(1)
        nodes.add_worker()  # a replacement node joins; the worker group restarts on it
        driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
        reader.join(timeout=10)
    out = "".join(output)
    assert driver.returncode == 0, out[-6000:]
    [(run, steps)] = mlflow_runs(spread_study)
    assert run.info.status == "FINISHED"
    assert steps == list(range(FAULT_EPOCHS)), "one MLflow run, every epoch logged exactly once"
    resumes = resumed_at(spread_study, run)
    assert len(resumes) == 1, f"one restart of the worker group, from a checkpoint: {resumes}\n{out[-8000:]}"
    [resumed] = resumes
    assert resumed != (0, 0) and resumed >= min(before), "resumed at a checkpoint's step, not from scratch"


class _Proxy:
    """A TCP relay to the dashboard that can be cut and restored on the same port: a real dropped
    connection (a broken port-forward, a restarted load balancer) between the client and Ray."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_ports(1)[0]
        self.start()

    def start(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        self.listener.close()
        for s in self.open:
            with contextlib.suppress(OSError):
                s.close()


def test_waiting_survives_a_dropped_dashboard_connection(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from ray.job_submission import JobStatus, JobSubmissionClient

    from pipeline.submit import wait_for

    proxy = _Proxy(int(nodes.dashboard.rsplit(":", 1)[1]))
    client = JobSubmissionClient(
        f"http://127.0.0.1:{proxy.port}", headers={"Authorization": f"Bearer {nodes.token}"}
    )
    job = client.submit_job(entrypoint="python -c 'import time; time.sleep(10)'")

    def outage() -> None:
        time.sleep(1)
        proxy.cut()
        time.sleep(5)
        proxy.start()

    threading.Thread(target=outage, daemon=True).start()
    with caplog.at_level(logging.WARNING, logger="pipeline.submit"):
        info = wait_for(client, job, poll_s=0.5, give_up_s=60)
    assert info.status == JobStatus.SUCCEEDED
    assert "dashboard unreachable" in caplog.text, "the outage happened while waiting"
