"""Tracking-store checks and run metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import free_port

from pipeline.tracking import TrackingUnavailable, check_tracking, flatten, git_state, tracking_uri


def test_unreachable_server_fails_fast_naming_the_uri() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingUnavailable, match=uri.replace(".", r"\.")):
        check_tracking(uri, timeout=2)


def test_sqlite_in_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(TrackingUnavailable, match="nowhere"):
        check_tracking(f"sqlite:///{tmp_path}/nowhere/mlflow.db")
    check_tracking(f"sqlite:///{tmp_path}/mlflow.db")


def test_default_uri_is_an_absolute_sqlite_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking_uri(tmp_path) == "http://mlflow:5000"


def test_git_state_outside_a_checkout(tmp_path: Path) -> None:
    assert git_state(tmp_path) == {"git_commit": "unknown", "git_dirty": "unknown"}


def test_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": {}}) == {"a.b": 1, "a.c.d": 2, "e": {}}


def test_train_stage_with_an_unreachable_server_fails_fast_before_any_worker(
    tiny_shards: Path, tmp_path: Path, root: Path
) -> None:
    """The acceptance check of the training stage: an unreachable MLFLOW_TRACKING_URI stops it
    within 15 s, naming the URI, before Ray (let alone a worker) starts and before any output."""
    import os
    import subprocess
    import sys
    import time

    import yaml

    raw = yaml.safe_load((root / "profiles/mini.yaml").read_text())
    raw["data"]["shards"]["output"] = str(tiny_shards)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # the stage's repo root is tmp_path
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    uri = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(root), "RAY_ADDRESS": ""}
    variant = next(iter(raw["variants"]))
    tic = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "stages.train", "--variant", variant],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - tic
    assert proc.returncode != 0
    assert uri in proc.stderr
    assert elapsed < 15, f"took {elapsed:.1f} s"
    assert "Ray" not in proc.stderr  # no local instance started, no cluster contacted
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()
