"""The ``evaluate`` stage: one outside checkpoint over the validation shards, one MLflow run, one record.

For ``pretrained.<name>`` of ``params.yaml`` :func:`evaluate_entry` resolves the checkpoint
(:func:`pipeline.pretrained.resolve_checkpoint`), optionally rewrites it in the T2T-ViT authors'
release format first, loads it through timm's pretrained path, evaluates the ``val`` shards with the
model's own data config (T2T-ViT: bicubic, crop 0.9; DeiT: 0.875) and logs an MLflow run: the file's
sha256 and the data manifest's as tags; top-1, top-5 and images/s; per-class accuracy as an artifact;
for a DVT cascade every exit's top-1, this study's threshold curve, and the curve the authors stored in
the file. It writes ``results/pretrained/<name>.json``, which the report reads.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.config import PretrainedConfig, StudyConfig
from pipeline.pretrained import (
    EvalResult,
    class_names,
    create_model,
    data_config,
    dvt_curve,
    evaluate,
    export_authors_t2t,
    resolve_checkpoint,
)

log = logging.getLogger(__name__)

#: Where ``export_authors_format`` writes its ``.pth.tar`` (relative to the repository): with the
#: other scratch files under ``runs/``, not in ``results/``, whose every file is a DVC output (the
#: report depends on the whole folder, and a cluster job's saved state holds only outputs).
EXPORTS = "runs/exports"


def shard_loader(
    shards: str, transform: Any, batch_size: int, workers: int, *, verify_sha256: bool = False
) -> tuple[Any, int, list[str]]:
    """The ``val`` split of ``shards`` through ``transform``: loader, image count and the classes (wnids).
    With ``verify_sha256`` (``data.shards.verify_sha256``) each shard's sha256 is checked on its first
    read in a process."""
    from pipeline.data import build_eval_loader
    from pipeline.shards import read_manifest

    loader, count = build_eval_loader(
        shards,
        rank=0,
        world_size=1,
        batch_size=batch_size,
        transform=transform,
        loader_workers=workers,
        verify_sha256=verify_sha256,
    )
    return loader, count, list(read_manifest(shards)["classes"])


def folder_loader(folder: Path, transform: Any, batch_size: int, workers: int) -> tuple[Any, int, list[str]]:
    """Images in class folders (``<folder>/<wnid>/*``, sorted wnids as labels): loader, count, classes."""
    from timm.data import ImageDataset
    from torch.utils.data import DataLoader

    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    dataset = ImageDataset(str(folder), transform=transform)
    classes = [name for name, _ in sorted(dataset.reader.class_to_idx.items(), key=lambda kv: kv[1])]
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers), len(dataset), classes


def checked_classes(model: torch.nn.Module, path: Path, classes: list[str]) -> None:
    """Refuse a checkpoint whose classifier does not classify the evaluated classes."""
    stored = model.pretrained_cfg.get("num_classes")
    if stored != len(classes):
        raise ValueError(
            f"checkpoint {path} classifies {stored} classes but the evaluated images have {len(classes)}: "
            "evaluate it on the data set it was trained for"
        )


def per_class_rows(result: EvalResult, classes: list[str]) -> list[dict[str, Any]]:
    """One row per class: index, wnid, name, images, correct, top-1 (%)."""
    names = class_names(classes)
    return [
        {
            "index": i,
            "wnid": wnid,
            "name": names[i],
            "images": int(result.count[i]),
            "correct": int(result.correct[i]),
            "top1": 100.0 * result.correct[i] / result.count[i] if result.count[i] else None,
        }
        for i, wnid in enumerate(classes)
    ]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def evaluate_entry(cfg: StudyConfig, name: str, *, root: Path, results_dir: Path) -> dict[str, Any]:
    """Evaluate ``cfg.pretrained[name]`` on the val shards, log it to MLflow, write its record.

    Returns:
        The record written to ``results_dir/pretrained/<name>.json``.

    Raises:
        CheckpointError: the file is damaged, unsafe or of another architecture.
        ValueError: the checkpoint's classes are not the shards' classes.
    """
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from pipeline.models.checkpoints import read_dvt_published
    from pipeline.models.dvt import DynamicVisionTransformer
    from pipeline.shards import MANIFEST, Store, read_manifest, resolve_output
    from pipeline.tracking import (
        check_tracking,
        experiment_id,
        file_sha256,
        flatten,
        git_state,
        sha256_of,
        tracking_uri,
    )

    entry: PretrainedConfig = cfg.pretrained[name]
    uri = tracking_uri(root)
    check_tracking(uri)
    shards = resolve_output(cfg.data.shards.output, root)
    path, source_run = resolve_checkpoint(entry.checkpoint, root=root, tracking_uri=uri)
    out_dir = results_dir / "pretrained"
    classes = list(read_manifest(shards)["classes"])
    img_size, model_kwargs = entry.img_size, dict(entry.model_kwargs)
    if entry.export_authors_format:
        from pipeline.pretrained import project_config

        if not entry.model.startswith("t2t_vit"):
            raise ValueError(
                f"pretrained.{name}: export_authors_format writes the T2T-ViT authors' format; "
                f"{entry.model} is not a T2T-ViT"
            )

        config = project_config(path) or {}
        img_size = img_size or config.get("train", {}).get("img_size")
        model_kwargs = {**(config.get("model_kwargs") or {}), **model_kwargs}
        state = torch.load(path, map_location="cpu", weights_only=True)
        weights = state.get("model", state) if isinstance(state, dict) else state
        path = export_authors_t2t(
            weights,
            root / EXPORTS / f"{name}.pth.tar",  # scratch, beside Ray's: results/ holds only DVC outs
            arch=entry.model,
            args={"img_size": img_size, "num_classes": config.get("num_classes"), **model_kwargs},
        )
        log.info("%s: written in the T2T-ViT authors' release format to %s", name, path)

    model = create_model(
        entry.model, path, img_size=img_size, num_classes=len(classes), model_kwargs=model_kwargs
    )
    checked_classes(model, path, classes)
    data = data_config(model, img_size or _img_size(model), entry.crop_pct)
    from timm.data import create_transform

    transform = create_transform(**data, is_training=False)
    loader, count, _ = shard_loader(
        shards,
        transform,
        entry.batch_size,
        entry.loader_workers,
        verify_sha256=cfg.data.shards.verify_sha256,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log.info("%s: %s from %s, data config %s, %d images on %s", name, entry.model, path, data, count, device)
    result = evaluate(model, loader, len(classes), device=device, total=count)

    published = read_dvt_published(path) if isinstance(model, DynamicVisionTransformer) else None
    curve: list[dict[str, Any]] = []
    if isinstance(model, DynamicVisionTransformer):
        macs = [float(m) for m in model.stage_macs(data["input_size"][-1])]
        curve = dvt_curve(result, macs, holdout_fraction=entry.holdout_fraction, seed=entry.seed)

    sha = file_sha256(path)
    manifest_sha = sha256_of(Store(shards).url_of(MANIFEST))
    client = MlflowClient(uri)
    experiment = experiment_id(client, cfg.tracking.experiment, uri, root)
    tags = {
        **git_state(root),
        "dvc_stage": f"evaluate@{name}",
        "pretrained": name,
        "model": entry.model,
        "checkpoint": entry.checkpoint,
        "checkpoint_sha256": sha,
        "data_manifest_sha256": manifest_sha,
    }
    if source_run:
        tags["source_run_id"] = source_run
    run_id = client.create_run(experiment, run_name=f"evaluate-{name}", tags=tags).info.run_id
    params = flatten({"pretrained": entry.model_dump(mode="json"), "data_config": data})
    metrics = {"top1": result.top1, "top5": result.top5, "images_per_s": result.images_per_s}
    metrics.update({f"top1_exit{k + 1}": v for k, v in enumerate(result.exits_top1)})
    batch = [Metric(k, float(v), 0, 0) for k, v in metrics.items()]
    batch += [Metric("curve_top1", p["accuracy"], 0, i) for i, p in enumerate(curve)]
    batch += [Metric("curve_gmacs", p["avg_gmacs"], 0, i) for i, p in enumerate(curve)]
    client.log_batch(run_id, metrics=batch, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    with tempfile.TemporaryDirectory() as folder:
        _write_csv(Path(folder) / "per_class.csv", per_class_rows(result, classes))
        if curve:
            _write_csv(Path(folder) / "curve.csv", [_flat(p) for p in curve])
        if published is not None:
            (Path(folder) / "published.json").write_text(json.dumps(published.__dict__, indent=2))
        client.log_artifacts(run_id, folder)
    client.set_terminated(run_id, "FINISHED")

    record = {
        "name": name,
        "model": entry.model,
        "checkpoint": entry.checkpoint,
        "checkpoint_sha256": sha,
        "source_run_id": source_run,
        "run_id": run_id,
        "experiment": cfg.tracking.experiment,
        "data_manifest_sha256": manifest_sha,
        "img_size": data["input_size"][-1],
        "crop_pct": data["crop_pct"],
        "interpolation": data["interpolation"],
        "images": result.images,
        "top1": result.top1,
        "top5": result.top5,
        "images_per_s": result.images_per_s,
        "exits_top1": result.exits_top1,
        "curve": [{"avg_gmacs": p["avg_gmacs"], "top1": p["accuracy"]} for p in curve],
        "published": None if published is None else published.__dict__,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info(
        "%s: top-1 %.2f %%, top-5 %.2f %% -> %s", name, result.top1, result.top5, out_dir / f"{name}.json"
    )
    return record


def _img_size(model: torch.nn.Module) -> int:
    stage = getattr(model, "stages", [model])[0]
    return int(stage.patch_embed.img_size[0])


def _flat(point: dict[str, Any]) -> dict[str, Any]:
    return {
        "q": point["q"],
        "avg_gmacs": point["avg_gmacs"],
        "top1": point["accuracy"],
        **{f"threshold{k + 1}": t for k, t in enumerate(point["thresholds"])},
        **{f"exit{k + 1}_fraction": f for k, f in enumerate(point["exit_fractions"])},
    }
