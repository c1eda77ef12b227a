"""Determinism on CPU across a real 2-worker Ray Train run (DDP over gloo): the same seed and the same
worker count give the same losses for the first steps; another seed does not. The same runs show
what the runner tracks: one MLflow run per seed, the EMA and best-epoch metrics of every epoch, the
last and best weights, and the results file's summary over the seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_same_seed_and_workers_give_the_same_losses_over_ray(
    tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config
    from pipeline.train.runner import train_variant

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray token or config from the machine
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)

    raw = yaml.safe_load((ROOT / "profiles/mini.yaml").read_text())
    raw["data"]["shards"]["output"] = str(tiny_shards)
    # Two epochs of the first 3 steps each, with dropout-free augmentation still drawing random crops.
    raw["train"].update(img_size=32, epochs=2, warmup_epochs=0.5, batch_size=8, num_workers=2,
                        max_steps_per_epoch=3, ema_decay=0.9)  # fmt: skip
    tiny = {"model": "vit_tiny_patch16_224",
            "model_kwargs": {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}}  # fmt: skip
    # Three trainings: a with seed 0, and b once per seed, 0 (as a, under another name) and 1.
    raw["variants"] = {"a": tiny, "b": {**tiny, "train": {"seeds": [0, 1]}}}
    raw["dvt"].update(variants=["a"], backbones={}, reuse_ablation=[], budget_gmacs=1.0)  # not run here
    raw.pop("pretrained", None)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "params.yaml")

    ray.init(num_cpus=2, include_dashboard=False)  # one instance for the three runs
    try:
        records = {v: train_variant(cfg, v, root=tmp_path, results_dir=tmp_path / "results") for v in "ab"}
    finally:
        ray.shutdown()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def losses(run_id: str) -> list[float]:
        return [
            m.value
            for key in ("train_loss", "val_loss")
            for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        ]

    a, (b0, b1) = losses(records["a"]["run_id"]), [losses(r["run_id"]) for r in records["b"]["runs"]]
    assert len(a) == 4  # train and val loss of both epochs
    assert a == b0  # bit-identical, not merely close
    assert a != b1

    for record in records.values():
        for run in record["runs"]:
            for key in ("val_top1", "ema_val_top1", "ema_val_top5", "best_val_top1", "best_epoch"):
                assert [m.step for m in client.get_metric_history(run["run_id"], key)] == [0, 1], key
            artifacts = {f.path for f in client.list_artifacts(run["run_id"], "checkpoint")}
            assert artifacts == {"checkpoint/model.pt", "checkpoint/best.pt"}
    b_runs = records["b"]["runs"]
    assert [r["seed"] for r in b_runs] == [0, 1] and b_runs[0]["run_id"] != b_runs[1]["run_id"]
    assert [client.get_run(r["run_id"]).data.tags["seed"] for r in b_runs] == ["0", "1"]
    assert records["b"]["run_id"] == b_runs[0]["run_id"]
    top1 = records["b"]["summary"]["top1"]
    assert top1["metric"] == "ema_val_top1" and top1["n"] == 2  # the EMA weights are the reported ones
    assert top1["mean"] == pytest.approx(sum(r["ema_val_top1"] for r in b_runs) / 2)
    assert records["a"]["summary"]["top1"]["std"] is None and records["a"]["n"] == 1
    assert json.loads((tmp_path / "results" / "b.json").read_text()) == records["b"]
