"""Determinism on CPU across a real 2-worker Ray Train run (DDP over gloo): the same seed and the same
worker count give the same losses for the first steps; another seed does not."""

from __future__ import annotations

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
                        max_steps_per_epoch=3)  # fmt: skip
    tiny = {"model": "vit_tiny_patch16_224",
            "model_kwargs": {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}}  # fmt: skip
    # Three trainings differing only in their name (a, b) or their seed (c).
    raw["variants"] = {"a": tiny, "b": tiny, "c": {**tiny, "train": {"seeds": [1]}}}
    raw["dvt"]["variant"] = "a"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "params.yaml")

    ray.init(num_cpus=2, include_dashboard=False)  # one instance for the three runs
    try:
        records = {v: train_variant(cfg, v, root=tmp_path, results_dir=tmp_path / "results") for v in "abc"}
    finally:
        ray.shutdown()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def losses(variant: str) -> list[float]:
        run_id = records[variant]["run_id"]
        return [
            m.value
            for key in ("train_loss", "val_loss")
            for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        ]

    a, b, c = losses("a"), losses("b"), losses("c")
    assert len(a) == 4  # train and val loss of both epochs
    assert a == b  # bit-identical, not merely close
    assert a != c
