"""The evaluate stage and the command lines: real shards, real MLflow (SQLite), real checkpoint files.

A checkpoint of this study written in the T2T-ViT authors' release format must score exactly what the
training's own evaluation path scores on the same images; a DVT file in the DVT authors' layout logs
every exit, the threshold curve and the published curve it carries.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from mlflow.tracking import MlflowClient

import pipeline.models  # noqa: F401 - registers the models
from pipeline.config import AugmentConfig, parse_config
from pipeline.data import build_eval_loader, build_transforms
from pipeline.models.checkpoints import authors_dvt_names
from pipeline.tracking import file_sha256


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _cfg(root: Path, shards: Path, pretrained: dict) -> object:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["data"]["shards"]["output"] = str(shards)
    raw["pretrained"] = pretrained
    return parse_config(raw)


def _project_checkpoint(path: Path, img_size: int = 32, seed: int = 0) -> torch.nn.Module:
    """A t2t_vit_7 as a train stage logs it (checkpoint/model.pt: weights and run spec)."""
    torch.manual_seed(seed)
    model = timm.create_model("t2t_vit_7", img_size=img_size, num_classes=4).eval()
    config = {"model": "t2t_vit_7", "model_kwargs": {}, "train": {"img_size": img_size}, "num_classes": 4}
    torch.save({"model": model.state_dict(), "config": config}, path)
    return model


@torch.no_grad()
def _training_top1(model: torch.nn.Module, shards: Path, img_size: int) -> float:
    """Top-1 the way a training's end-of-epoch evaluation computes it (its transform and loader)."""
    _, transform = build_transforms(img_size, AugmentConfig())
    loader, _ = build_eval_loader(shards, rank=0, world_size=1, batch_size=16, transform=transform)
    hits = total = 0
    for images, labels in loader:
        hits += int((model(images).argmax(-1) == labels).sum())
        total += labels.numel()
    return 100.0 * hits / total


def test_training_in_the_authors_format_scores_its_training_top1(
    root: Path, tiny_shards: Path, tmp_path: Path, store: str
) -> None:
    from pipeline.evaluation import evaluate_entry

    # The training's checkpoint as an MLflow artifact and its results/<variant>.json record.
    (tmp_path / "results").mkdir()
    _project_checkpoint(tmp_path / "model.pt")
    client = MlflowClient(store)
    run = client.create_run(client.create_experiment("train", artifact_location=(tmp_path / "art").as_uri()))
    client.log_artifact(run.info.run_id, str(tmp_path / "model.pt"), artifact_path="checkpoint")
    record = tmp_path / "results" / "t2t_vit_7.json"
    record.write_text(json.dumps({"variant": "t2t_vit_7", "run_id": run.info.run_id}))

    entry = {"model": "t2t_vit_7", "checkpoint": "results/t2t_vit_7.json", "export_authors_format": True}
    cfg = _cfg(root, tiny_shards, {"mine": entry})
    out = evaluate_entry(cfg, "mine", root=tmp_path, results_dir=tmp_path / "results")

    exported = tmp_path / "runs" / "exports" / "mine.pth.tar"
    saved = torch.load(exported, weights_only=False)  # our own file: check its layout as the authors'
    assert {"state_dict", "state_dict_ema", "args", "epoch", "arch", "metric"} <= set(saved)
    assert "module.tokens_to_token.attention1.w" in saved["state_dict_ema"]

    model = timm.create_model("t2t_vit_7", img_size=32, num_classes=4).eval()
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True)["model"])
    assert out["top1"] == _training_top1(model, tiny_shards, 32)
    assert out["images"] == 16 and out["img_size"] == 32 and out["crop_pct"] == 0.9

    written = json.loads((tmp_path / "results" / "pretrained" / "mine.json").read_text())
    assert written == out
    mlflow_run = client.get_run(out["run_id"])
    assert mlflow_run.data.tags["checkpoint_sha256"] == file_sha256(exported)
    assert mlflow_run.data.tags["data_manifest_sha256"] == file_sha256(tiny_shards / "manifest.json")
    assert mlflow_run.data.tags["source_run_id"] == run.info.run_id
    assert mlflow_run.data.metrics["top1"] == pytest.approx(out["top1"])
    assert {"top5", "images_per_s"} <= set(mlflow_run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(out["run_id"])}
    assert "per_class.csv" in artifacts


def test_dvt_release_logs_exits_curve_and_published_curve(
    root: Path, tiny_shards: Path, tmp_path: Path, store: str
) -> None:
    from pipeline.evaluation import evaluate_entry

    torch.manual_seed(0)
    model = timm.create_model("dvt_t2t_vit_12", depth=1, img_size=64, num_classes=4)
    published = {
        "flops": [0.1, 0.2, 0.4],
        "anytime_classification": [30.0, 35.0, 40.0],
        "dynamic_threshold": torch.rand(59, 3),
        "budgeted_batch_classification": [[0.1, 0.2], [30.0, 40.0]],
    }
    path = tmp_path / "dvt.pth.tar"
    torch.save({"model_state_dict": authors_dvt_names(model.state_dict()), **published}, path)

    entry = {"model": "dvt_t2t_vit_12", "checkpoint": str(path), "img_size": 64, "model_kwargs": {"depth": 1}}
    out = evaluate_entry(_cfg(root, tiny_shards, {"dvt": entry}), "dvt", root=tmp_path, results_dir=tmp_path)
    assert len(out["exits_top1"]) == 3 and out["exits_top1"][-1] == out["top1"]
    assert len(out["curve"]) == 59
    assert all(p["avg_gmacs"] > 0 for p in out["curve"])
    assert out["published"]["budgeted_batch_classification"] == [[0.1, 0.2], [30.0, 40.0]]

    client = MlflowClient(store)
    run = client.get_run(out["run_id"])
    assert {"top1_exit1", "top1_exit2", "top1_exit3"} <= set(run.data.metrics)
    assert len(client.get_metric_history(out["run_id"], "curve_top1")) == 59
    assert {a.path for a in client.list_artifacts(out["run_id"])} >= {
        "per_class.csv",
        "curve.csv",
        "published.json",
    }


def test_wrong_class_count_is_refused(root: Path, tiny_shards: Path, tmp_path: Path, store: str) -> None:
    from pipeline.evaluation import evaluate_entry

    model = timm.create_model("t2t_vit_7", img_size=32)  # 1000 classes; the shards have 4
    path = tmp_path / "imagenet.pth"
    torch.save(model.state_dict(), path)
    cfg = _cfg(root, tiny_shards, {"x": {"model": "t2t_vit_7", "checkpoint": str(path), "img_size": 32}})
    with pytest.raises(ValueError, match="1000 classes") as err:
        evaluate_entry(cfg, "x", root=tmp_path, results_dir=tmp_path)
    assert str(path) in str(err.value)


def test_command_line_on_shards_and_on_an_image_folder_agree(
    tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import stages.evaluate

    model = _project_checkpoint(tmp_path / "model.pt")
    images = tiny_shards.parent / "images" / "val"
    results = []
    for source in (["--shards", str(tiny_shards)], ["--images", str(images)]):
        argv = ["evaluate", "--model", "t2t_vit_7", "--checkpoint", str(tmp_path / "model.pt"), *source]
        monkeypatch.setattr(sys, "argv", argv)
        stages.evaluate.main()
        out = capsys.readouterr().out
        assert "Acc@1" in out
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["top1"] == results[1]["top1"] == round(_training_top1(model, tiny_shards, 32), 3)
    assert results[0]["images"] == results[1]["images"] == 16


def _altered_copy(tiny_shards: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the shards whose first val shard had three bytes of a member's zero padding changed
    after the manifest was written (same size, samples and images: only its sha256 differs)."""
    import shutil
    import tarfile

    from pipeline.data import shard_urls

    shards = Path(shutil.copytree(tiny_shards, tmp_path / "altered"))
    victim = Path(shard_urls(shards, "val")[0][0])
    with tarfile.open(victim) as tar:
        member = next(m for m in tar.getmembers() if 0 < m.size % 512 <= 509)
    raw = bytearray(victim.read_bytes())
    raw[member.offset_data + member.size : member.offset_data + member.size + 3] = b"\x01\x02\x03"
    victim.write_bytes(bytes(raw))
    return shards, victim


def test_the_stage_and_the_command_line_check_sha256_when_asked(
    root: Path, tiny_shards: Path, tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    import re

    import stages.evaluate
    from pipeline import data
    from pipeline.data import SampleError
    from pipeline.evaluation import evaluate_entry

    shards, victim = _altered_copy(tiny_shards, tmp_path)
    _project_checkpoint(tmp_path / "model.pt")
    error = rf"shard {re.escape(str(victim))}: sha256 [0-9a-f]{{64}}, its manifest record"
    entry = {"x": {"model": "t2t_vit_7", "checkpoint": str(tmp_path / "model.pt"), "img_size": 32}}
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["data"]["shards"].update(output=str(shards), verify_sha256=True)
    raw["pretrained"] = entry
    monkeypatch.setattr(data, "_VERIFIED", set())
    with pytest.raises(SampleError, match=error):  # the stage, data.shards.verify_sha256: true
        evaluate_entry(parse_config(raw), "x", root=tmp_path, results_dir=tmp_path / "results")

    checkpoint = str(tmp_path / "model.pt")
    argv = ["evaluate", "--model", "t2t_vit_7", "--checkpoint", checkpoint, "--shards", str(shards)]
    monkeypatch.setattr(sys, "argv", [*argv, "--verify-sha256"])
    with pytest.raises(SampleError, match=error):
        stages.evaluate.main()
    monkeypatch.setattr(sys, "argv", argv)  # params.yaml leaves it off
    stages.evaluate.main()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 16


def test_predict_prints_imagenet_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image
    from timm.data import ImageNetInfo

    from pipeline.predict import main

    model = timm.create_model("t2t_vit_7", img_size=32)
    path = tmp_path / "t2t7.pth"
    torch.save({"state_dict_ema": model.state_dict()}, path)
    image = tmp_path / "dog.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(image)
    assert main(["--model", "t2t_vit_7", "--checkpoint", str(path), "--img-size", "32", str(image)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(image) and len(lines) == 6
    names = set(ImageNetInfo().label_descriptions())
    assert all(line.split("%", 1)[1].strip() in names for line in lines[1:])

    assert main(["--model", "t2t_vit_7", "--checkpoint", str(tmp_path / "nope.pth"), str(image)]) == 1
    assert "nope.pth" in capsys.readouterr().err


def test_mlflow_references_resolve_to_the_runs_checkpoint(tmp_path: Path, store: str) -> None:
    from pipeline.pretrained import create_model, resolve_checkpoint

    torch.manual_seed(0)
    reference = timm.create_model("t2t_vit_7", img_size=32, num_classes=4, depth=2).eval()
    config = {"model": "t2t_vit_7", "model_kwargs": {"depth": 2}, "train": {"img_size": 32}, "num_classes": 4}
    torch.save({"model": reference.state_dict(), "config": config}, tmp_path / "model.pt")
    client = MlflowClient(store)
    run = client.create_run(client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri()))
    client.log_artifact(run.info.run_id, str(tmp_path / "model.pt"), artifact_path="checkpoint")
    run_id = run.info.run_id
    for ref in (f"mlflow:{run_id}", run_id, f"runs:/{run_id}/checkpoint/model.pt"):
        path, source = resolve_checkpoint(ref, root=tmp_path, tracking_uri=store)
        assert source == run_id and file_sha256(path) == file_sha256(tmp_path / "model.pt")
    # The stored run spec supplies the model's arguments (depth 2, 32 px, 4 classes).
    model = create_model("t2t_vit_7", path)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="t2t_vit_7, not t2t_vit_10"):
        create_model("t2t_vit_10", path)
    with pytest.raises(FileNotFoundError, match="docs/models.md"):
        resolve_checkpoint("checkpoints/nope.pth.tar", root=tmp_path)


@pytest.mark.parametrize("profile", ["params.yaml", "profiles/mini.yaml", "profiles/imagenet.yaml"])
def test_every_pretrained_entry_names_a_registered_model(root: Path, profile: str) -> None:
    from pipeline.config import load_config

    cfg = load_config(root / profile)
    assert {e.model for e in cfg.pretrained.values()} <= set(timm.list_models())
    for name, entry in cfg.pretrained.items():
        assert not entry.export_authors_format or entry.model.startswith("t2t_vit"), name
