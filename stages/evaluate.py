"""DVC stage ``evaluate@<name>``: evaluate a published (or any outside) checkpoint on the val shards.

As a stage, ``--name`` is a key of the ``pretrained`` section of params.yaml: the checkpoint is loaded
through timm's pretrained path, evaluated with the model's data config, logged as one MLflow run
(file sha256, data manifest hash, top-1, top-5, images/s, per-class accuracy; a DVT cascade's exits
and threshold curve) and written to ``results/pretrained/<name>.json``.

As a command line, like timm's ``validate.py`` (prints top-1, top-5 and images/s, no MLflow)::

    python -m stages.evaluate --model t2t_vit_14 --checkpoint 81.5_T2T_ViT_14.pth.tar \\
        [--img-size 224] [--crop-pct 0.9] [--shards DIR | --images DIR] [--verify-sha256]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.paths import repo_root
from stages import _cli

# "pretrained.{variant}" is the entry's own section: dvc.yaml declares pretrained.${key}.
PARAMS = ["pretrained.{variant}", "data.shards.output", "data.shards.verify_sha256", "tracking"]


def _standalone(args, cfg) -> None:  # noqa: ANN001 - argparse namespace, the params (or None)
    import torch
    from timm.data import create_transform

    from pipeline.evaluation import checked_classes, folder_loader, shard_loader
    from pipeline.pretrained import create_model, data_config, evaluate, resolve_checkpoint
    from pipeline.shards import resolve_output

    root = repo_root()
    path, _ = resolve_checkpoint(args.checkpoint, root=root)
    model = create_model(args.model, path, img_size=args.img_size, num_classes=args.num_classes)
    side = args.img_size or int(getattr(model, "stages", [model])[0].patch_embed.img_size[0])
    data = data_config(model, side, args.crop_pct)
    transform = create_transform(**data, is_training=False)
    if args.images:
        loader, count, classes = folder_loader(args.images, transform, args.batch_size, args.workers)
    else:
        shards = args.shards or resolve_output(_cli.config(args.params).data.shards.output, root)
        verify = args.verify_sha256
        if verify is None:
            verify = cfg is not None and cfg.data.shards.verify_sha256
        loader, count, classes = shard_loader(
            str(shards), transform, args.batch_size, args.workers, verify_sha256=verify
        )
    checked_classes(model, path, classes)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"{args.model} from {path}: {count} images, {data}", file=sys.stderr)
    result = evaluate(model, loader, len(classes), device=device, total=count)
    summary = {
        "model": args.model,
        "checkpoint": str(path),
        "top1": round(result.top1, 3),
        "top5": round(result.top5, 3),
        "images_per_s": round(result.images_per_s, 1),
        "images": result.images,
        "img_size": data["input_size"][-1],
        "crop_pct": data["crop_pct"],
    }
    if result.exits_top1:
        summary["exits_top1"] = [round(v, 3) for v in result.exits_top1]
    print(
        f" * Acc@1 {result.top1:.3f} ({100 - result.top1:.3f}) Acc@5 {result.top5:.3f} "
        f"({100 - result.top5:.3f}) {result.images_per_s:.1f} images/s"
    )
    print(json.dumps(summary))


def main() -> None:
    p = _cli.parser(__doc__.splitlines()[0])
    p.add_argument("--name", help="stage mode: a key of the pretrained section of params.yaml")
    p.add_argument("--results", default="results", help="folder for pretrained/<name>.json (stage mode)")
    p.add_argument("--model", help="command-line mode: a timm model name (after import pipeline.models)")
    p.add_argument(
        "--checkpoint", help="command-line mode: a file, URI, MLflow run or results/<variant>.json"
    )
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's)")
    p.add_argument("--crop-pct", type=float, default=None, help="centre-crop fraction (default: the model's)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the checkpoint's head")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--shards", type=Path, help="a shard folder (default: data.shards.output of params)")
    source.add_argument("--images", type=Path, help="a folder of class folders <wnid>/*.JPEG")
    p.add_argument(
        "--verify-sha256",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="check each shard's sha256 against its manifest (default: data.shards.verify_sha256 of params)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    args = p.parse_args()
    # params.yaml is validated in both modes (the command line reads data.shards.output from it).
    cfg = _cli.config(args.params) if args.name or args.params.is_file() else None
    if args.name is None:
        if not (args.model and args.checkpoint):
            p.error("give --name (stage mode) or both --model and --checkpoint (command-line mode)")
        _standalone(args, cfg)
        return
    assert cfg is not None
    if args.name not in cfg.pretrained:
        sys.exit(
            f"error: {args.params}: no pretrained entry {args.name!r}; entries are {sorted(cfg.pretrained)}"
        )

    from pipeline.tracking import check_tracking, tracking_uri

    root = repo_root()
    check_tracking(tracking_uri(root))  # before torch is imported: fails in seconds

    from pipeline.evaluation import evaluate_entry

    evaluate_entry(cfg, args.name, root=root, results_dir=root / args.results)


if __name__ == "__main__":
    from pipeline.models.checkpoints import CheckpointError
    from pipeline.shards import ShardError
    from pipeline.tracking import TrackingUnavailable

    _cli.run(main, CheckpointError, ShardError, TrackingUnavailable, ValueError, FileNotFoundError)
