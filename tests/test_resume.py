"""Resumable checkpoints are never deleted on a guess, never shared by two trainers, and a tracking
store that goes away never hides the training's own error. Real MLflow (a SQLite store, and a real
``mlflow server`` that is stopped mid-run), real checkpoint folders, a real second process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import free_port

from pipeline.storage import LeaseHeld
from pipeline.train.resume import CheckpointsKept, code_hash, resumable_run, run_key, training_lease

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _checkpoints(storage: Path, name: str) -> Path:
    folder = storage / name / "checkpoint_000001"
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(b"weights")
    return storage / name


@pytest.fixture(scope="module")
def mlflow_client(tmp_path_factory: pytest.TempPathFactory):
    """One SQLite store for the module (creating one costs seconds of schema migrations)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")


@pytest.fixture()
def store(mlflow_client, request: pytest.FixtureRequest):
    """The client and a fresh experiment per test."""
    return mlflow_client, mlflow_client.create_experiment(request.node.name)


def test_the_key_covers_tracking_target_and_code(tmp_path: Path) -> None:
    package = tmp_path / "pipeline"
    for rel in ("train/loop.py", "models/vit.py", "data.py", "report/other.py"):
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text("x = 1\n")
    code = code_hash(package)
    (package / "report" / "other.py").write_text("x = 2\n")
    assert code_hash(package) == code, "code the training does not run leaves the key alone"
    (package / "train" / "loop.py").write_text("x = 2\n")
    assert code_hash(package) != code
    base = run_key("p", tracking_uri="sqlite:///a.db", experiment="e", code="c")
    assert len({base, *(
        run_key(*a, **k)
        for a, k in [
            (("q",), {"tracking_uri": "sqlite:///a.db", "experiment": "e", "code": "c"}),
            (("p",), {"tracking_uri": "http://mlflow:5000", "experiment": "e", "code": "c"}),
            (("p",), {"tracking_uri": "sqlite:///a.db", "experiment": "e2", "code": "c"}),
            (("p",), {"tracking_uri": "sqlite:///a.db", "experiment": "e", "code": "d"}),
        ]
    )}) == 5  # fmt: skip


def test_an_unfinished_run_is_resumed_and_its_checkpoints_kept(tmp_path: Path, store) -> None:
    client, exp = store
    folder = _checkpoints(tmp_path / "runs", "tiny-k1")
    run = client.create_run(exp, tags={"run_key": "k1"}).info.run_id
    client.set_terminated(run, status="KILLED")
    assert resumable_run(client, exp, "k1", str(tmp_path / "runs"), "tiny-k1") == run
    assert (folder / "checkpoint_000001" / "state.pt").is_file()


def test_checkpoints_are_deleted_only_after_a_finished_run_is_confirmed(tmp_path: Path, store) -> None:
    client, exp = store
    folder = _checkpoints(tmp_path / "runs", "tiny-k1")
    run = client.create_run(exp, tags={"run_key": "k1"}).info.run_id
    client.set_terminated(run, status="FINISHED")
    assert resumable_run(client, exp, "k1", str(tmp_path / "runs"), "tiny-k1") is None
    assert not folder.exists()


def test_checkpoints_without_a_run_in_this_store_are_kept_and_named(tmp_path: Path, store) -> None:
    """The store was reset (or is another one): nothing proves the training finished."""
    client, _ = store
    folder = _checkpoints(tmp_path / "runs", "tiny-k1")
    fresh = client.create_experiment("a-new-experiment")
    with pytest.raises(CheckpointsKept, match=rf"{folder}.*run_key=k1.*Nothing was deleted"):
        resumable_run(client, fresh, "k1", str(tmp_path / "runs"), "tiny-k1")
    assert (folder / "checkpoint_000001" / "state.pt").read_bytes() == b"weights"


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pipeline.train.resume import training_lease
    with training_lease(sys.argv[1], "tiny-k1"):
        print("held", flush=True)
        time.sleep(600)
    """
)


def test_a_second_trainer_of_the_same_key_fails_at_once_naming_the_first(tmp_path: Path) -> None:
    first = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "runs")],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout.readline().strip() == "held"
        tic = time.monotonic()
        with pytest.raises(LeaseHeld, match=rf"training tiny-k1 is in use by pid {first.pid}"):
            training_lease(str(tmp_path / "runs"), "tiny-k1").acquire()
        assert time.monotonic() - tic < 5
        with training_lease(str(tmp_path / "runs"), "tiny-k2"):  # another key is free
            pass
    finally:
        first.kill()
        first.wait()


def test_a_tracking_server_gone_keeps_the_training_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's status goes to a server that no longer answers (nothing listens on its port)."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import TrackingUnavailable, tracked_run

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    run = client.create_run(client.create_experiment("e")).info.run_id
    gone = MlflowClient(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(RuntimeError, match="loss is NaN") as caught, tracked_run(gone, run):
        raise RuntimeError("loss is NaN at step 7")
    assert any("could not be marked FAILED" in n for n in caught.value.__notes__)
    # A training that finished but whose status cannot be written: the stage fails, naming the run.
    with (
        pytest.raises(TrackingUnavailable, match=f"{run} could not be marked FINISHED"),
        tracked_run(gone, run),
    ):
        pass
