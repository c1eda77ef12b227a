"""Top-5 ImageNet classes of images, by a checkpoint loaded the timm way.

    python -m pipeline.predict --model t2t_vit_14 --checkpoint 81.5_T2T_ViT_14.pth.tar dog.jpg cat.png

The checkpoint is anything :func:`pipeline.pretrained.resolve_checkpoint` accepts (the authors'
releases, timm files, this study's runs); each image goes through the model's evaluation transform
(its resize, crop and interpolation). Class names come from timm's ``ImageNetInfo``; a checkpoint of
another class count prints class indices.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def predict(
    model_name: str, checkpoint: str, images: Sequence[Path], *, img_size: int | None = None, top: int = 5
) -> list[list[tuple[str, float]]]:
    """The ``top`` (label, probability) pairs of every image, most probable first.

    Raises:
        CheckpointError: the checkpoint cannot be loaded (named, with the reason).
        FileNotFoundError: an image is missing.
    """
    import torch
    from PIL import Image
    from timm.data import ImageNetInfo, create_transform

    from pipeline.paths import repo_root
    from pipeline.pretrained import create_model, data_config, resolve_checkpoint

    path, _ = resolve_checkpoint(checkpoint, root=repo_root())
    model = create_model(model_name, path, img_size=img_size)
    side = img_size or int(getattr(model, "stages", [model])[0].patch_embed.img_size[0])
    transform = create_transform(**data_config(model, side), is_training=False)
    info = ImageNetInfo()
    out = []
    for image in images:
        if not Path(image).is_file():
            raise FileNotFoundError(f"image {image} does not exist")
        with Image.open(image) as img:
            x = transform(img.convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            output = model(x)
        logits = output[-1] if isinstance(output, list | tuple) else output  # a cascade: its last exit
        probs = logits.float().softmax(-1)[0]
        values, indices = probs.topk(min(top, probs.numel()))
        names = [
            info.index_to_description(int(i)) if probs.numel() == info.num_classes() else f"class {int(i)}"
            for i in indices
        ]
        out.append(list(zip(names, values.tolist(), strict=True)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the top-5 classes of each image."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.predict",
        description="Print the top-5 ImageNet classes of images, by name (checkpoint loaded the timm way).",
    )
    parser.add_argument("--model", required=True, help="a timm model name (after import pipeline.models)")
    parser.add_argument(
        "--checkpoint", required=True, help="a file, URI, MLflow run or results/<variant>.json"
    )
    parser.add_argument("--img-size", type=int, default=None, help="input side (default: the model's)")
    parser.add_argument("images", nargs="+", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from pipeline.models.checkpoints import CheckpointError

    try:
        results = predict(args.model, args.checkpoint, args.images, img_size=args.img_size)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for image, top in zip(args.images, results, strict=True):
        print(image)
        for name, prob in top:
            print(f"  {100 * prob:6.2f} %  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
