"""Shards in an object store, end to end, against a real S3 API server: moto's server, started here as
a subprocess on a free localhost port, reached through s3fs/botocore over HTTP exactly as AWS or MinIO
would be (``AWS_ENDPOINT_URL``). Nothing of ours is mocked.

- the shard stage writes ``s3://`` output from 2 worker processes, byte-identical to a local
  sharding of the same input, and a re-run after an interruption keeps the complete shards;
- the loader reads equal batch counts on 2 ranks from the bucket, the same samples as from local shards;
- ``train_variant`` trains on the bucket's shards with 2 Ray workers and tags the MLflow run with the
  sha256 of the manifest's bytes on S3.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, copy_worktree, free_port

pytest.importorskip("s3fs", reason="the s3 test needs the test extra: pip install -e '.[test]'")
pytest.importorskip("moto.server", reason="the s3 test needs moto[server] (the test extra)")

from pipeline.shards import INDEX, MANIFEST, PARTIAL, read_manifest  # noqa: E402

BUCKET = "t2t-study-test"
URI = f"s3://{BUCKET}/shards"
SHARD_ARGS = ["--max-samples-per-shard", "10", "--seed", "0"]  # what tests/conftest.py's tiny_shards uses


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server in its own process; its URL once it answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2):  # noqa: S310 (our own localhost server)
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"moto's S3 server did not start:\n{log.read_text()[-3000:]}"
                    ) from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def s3(endpoint: str) -> Iterator[object]:
    """The environment pointing botocore at the server (inherited by every subprocess and by the Ray
    workers a local Ray instance starts), a fresh bucket, and an s3fs filesystem on it."""
    import s3fs

    with pytest.MonkeyPatch.context() as mp:
        for var, value in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            mp.setenv(var, value)
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.delenv(var, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # none made before these variables may be reused
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs
        s3fs.S3FileSystem.clear_instance_cache()


def _shard_stage(source: Path, output: str) -> subprocess.CompletedProcess:
    """``python -m stages.shard`` with 2 worker processes, in a fresh process: its fork server starts
    with this environment (a fork server started earlier in the pytest process would not see the
    monkeypatched AWS variables)."""
    proc = subprocess.run(
        [sys.executable, "-m", "stages.shard", "--source", str(source), "--output", output, "--workers", "2"]
        + SHARD_ARGS,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def s3_shards(s3, tiny_shards: Path) -> str:
    """The tiny ImageNet-layout set (the one tests/conftest.py shards locally) sharded into the bucket."""
    proc = _shard_stage(tiny_shards.parent / "images", URI)
    assert "7 shards (0 complete)" in proc.stderr and "2 worker(s)" in proc.stderr, proc.stderr[-4000:]
    return URI


def test_s3_shards_match_local_ones_byte_for_byte_and_resume(s3, s3_shards: str, tiny_shards: Path) -> None:
    remote, local = read_manifest(s3_shards), read_manifest(tiny_shards)
    assert remote == local
    assert s3.cat(f"{BUCKET}/shards/{MANIFEST}") == (tiny_shards / MANIFEST).read_bytes()
    shards = [s for split in ("train", "val") for s in remote["splits"][split]["shards"]]
    assert len(shards) == 7  # 48 train images in 5 shards, 16 val in 2: both workers got work
    for s in shards:  # what is in the bucket is what the manifest says, and what local sharding wrote
        data = s3.cat(f"{BUCKET}/shards/{s['name']}")
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
        assert data == (tiny_shards / s["name"]).read_bytes()
    assert s3.cat(f"{BUCKET}/shards/{INDEX}") == (tiny_shards / INDEX).read_bytes()
    assert not [n for n in s3.ls(f"{BUCKET}/shards") if n.endswith(".tmp")]

    # A finished folder (no progress record left: its manifest and index stand in for one) that lost
    # a shard and holds a half-written temporary.
    assert not s3.exists(f"{BUCKET}/shards/{PARTIAL}")
    s3.rm_file(f"{BUCKET}/shards/train-000003.tar")
    s3.pipe(f"{BUCKET}/shards/train-000004.tar.tmp", b"half a shard")
    s3.invalidate_cache()
    again = _shard_stage(tiny_shards.parent / "images", s3_shards)
    assert "wrote 1 shard(s), kept 6" in again.stderr, again.stderr[-4000:]
    s3.invalidate_cache()
    assert s3.cat(f"{BUCKET}/shards/{MANIFEST}") == (tiny_shards / MANIFEST).read_bytes()
    assert s3.cat(f"{BUCKET}/shards/train-000003.tar") == (tiny_shards / "train-000003.tar").read_bytes()
    assert not [n for n in s3.ls(f"{BUCKET}/shards") if n.endswith(".tmp")]


def test_loader_reads_equal_batches_per_rank_from_s3(s3_shards: str, tiny_shards: Path) -> None:
    from pipeline.config import AugmentConfig
    from pipeline.data import build_eval_loader, build_train_loader, build_transforms

    train_tf, eval_tf = build_transforms(32, AugmentConfig())

    def train_labels(folder: str, rank: int) -> tuple[list[list[int]], int]:
        loader, steps = build_train_loader(
            folder, rank=rank, world_size=2, batch_per_rank=4, transform=train_tf, seed=0
        )
        batches = []
        for images, labels in loader:
            assert tuple(images.shape) == (4, 3, 32, 32)
            batches.append(labels.tolist())
        return batches, steps

    per_rank = [train_labels(s3_shards, rank) for rank in (0, 1)]
    assert [len(b) for b, _ in per_rank] == [6, 6] and [s for _, s in per_rank] == [6, 6]  # 48 // (2 * 4)
    # The same samples in the same order as from the local copy: only where the bytes come from differs.
    assert per_rank[0][0] == train_labels(str(tiny_shards), 0)[0]

    seen: list[int] = []
    for rank in (0, 1):
        loader, count = build_eval_loader(s3_shards, rank=rank, world_size=2, batch_size=5, transform=eval_tf)
        assert count == 16
        seen += [label for _, labels in loader for label in labels.tolist()]
    assert sorted(seen) == sorted(label for label in range(4) for _ in range(4))  # every val sample once


def test_dvc_tracks_the_s3_manifest(s3, tiny_shards: Path, tmp_path: Path) -> None:
    """The repository's own dvc.yaml with ``data.shards.output`` in the bucket (needs dvc-s3): the shard
    stage's out ``${data.shards.output}/manifest.json`` is recorded, checked and left alone on resume."""
    repo = tmp_path / "repo"
    copy_worktree(ROOT, repo)
    (repo / "dvc.lock").unlink(missing_ok=True)
    raw = yaml.safe_load((ROOT / "profiles/mini.yaml").read_text())
    output = f"s3://{BUCKET}/dvc-shards"
    raw["data"].update(source="folder", root=str(tiny_shards.parent / "images"))
    raw["data"]["shards"].update(output=output, max_samples_per_shard=10, seed=0, workers=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def dvc(*args: str) -> str:
        proc = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout + proc.stderr

    for cmd in (
        ["init", "-q"],
        ["add", "-A"],
        ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "c"],
    ):
        subprocess.run(["git", *cmd], cwd=repo, check=True, capture_output=True, timeout=60)
    assert "Running stage 'shard'" in dvc("repro", "shard")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    [out] = lock["stages"]["shard"]["outs"]
    manifest = s3.cat(f"{BUCKET}/dvc-shards/{MANIFEST}")
    assert manifest == (tiny_shards / MANIFEST).read_bytes()
    # For an S3 out DVC records the object's ETag: the md5 of the bytes for a single-part upload.
    assert (
        out["path"] == f"{output}/{MANIFEST}" and out["etag"].strip('"') == hashlib.md5(manifest).hexdigest()
    )
    assert "didn't change" in dvc("repro", "shard")
    # The manifest is a persistent out: DVC leaves it for the re-run, which keeps every shard it lists.
    assert "wrote 0 shard(s), kept 7" in dvc("repro", "-f", "-s", "shard")
    s3.invalidate_cache()
    s3.pipe(f"{BUCKET}/dvc-shards/{MANIFEST}", b"{}")  # changed behind DVC's back: seen
    assert f"modified:           {output}/{MANIFEST}" in dvc("status", "shard")


@pytest.mark.slow
def test_train_variant_trains_from_s3_shards_with_ray(
    s3, s3_shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config
    from pipeline.train.runner import train_variant

    assert not ray.is_initialized(), "train_variant must start its own local Ray instance here"
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # no ~/.ray token or config from the machine
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)

    raw = yaml.safe_load((ROOT / "profiles/mini.yaml").read_text())
    raw["data"]["shards"]["output"] = s3_shards
    raw["train"].update(img_size=32, epochs=1, warmup_epochs=0, batch_size=8, num_workers=2)
    raw["variants"] = {
        "tiny": {
            "model": "vit_tiny_patch16_224",
            "model_kwargs": {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
        }
    }
    # The tune stage is not run here; its section must still name a variant.
    raw["dvt"].update(variants=["tiny"], backbones={}, reuse_ablation=[], budget_gmacs=1.0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "params.yaml")

    # The Ray workers read every shard from the bucket: they only can if they inherited the driver's
    # AWS_ENDPOINT_URL (without it botocore would go to the real AWS, unreachable here, and fail).
    record = train_variant(cfg, "tiny", root=tmp_path, results_dir=tmp_path / "results")

    saved = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert saved == record and saved["val_top1"] is not None and saved["epochs"] == 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    manifest_bytes = s3.cat(f"{BUCKET}/shards/{MANIFEST}")
    assert run.data.tags["data_manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")] == [0]

    # What tune_dvt reads back: the final weights with the RunSpec, whose shards is the URI unchanged.
    from pipeline.dvt.study import load_final_state

    state = load_final_state(f"sqlite:///{tmp_path / 'mlflow.db'}", record["run_id"])
    assert state["config"]["shards"] == s3_shards
