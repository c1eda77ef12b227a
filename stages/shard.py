"""DVC stage ``shard``: an ImageNet download to WebDataset tar shards, manifest and index.

Inside the pipeline it reads ``data.root`` and ``data.shards`` (all but ``verify_sha256``, which
only the readers use) from params.yaml. Standalone, on any folder and without touching params.yaml
(docs/data.md):

    python -m stages.shard --source /datasets/imagenet --output /fast/shards --workers 0

An interrupted run keeps its complete shards: run the same command again to finish.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ShardConfig
from pipeline.paths import resolve
from pipeline.shards import ShardError, resolve_output, write_shards
from pipeline.storage import LeaseHeld
from stages import _cli

# Every key of data.shards but verify_sha256 (a reader's check): switching it on re-runs no sharding.
PARAMS = [
    "data.root",
    "data.shards.output",
    "data.shards.max_samples_per_shard",
    "data.shards.max_bytes_per_shard",
    "data.shards.seed",
    "data.shards.workers",
    "data.shards.verify",
    "data.shards.on_bad_image",
]


def main() -> None:
    p = _cli.parser(__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, help="ImageNet download (default: data.root from params)")
    p.add_argument(
        "--output", help="output folder or fsspec URI, e.g. s3://bucket/shards (default: data.shards.output)"
    )
    p.add_argument("--max-samples-per-shard", type=int, help="samples per shard (default: from params)")
    p.add_argument("--max-bytes-per-shard", type=int, help="bytes per shard (default: from params)")
    p.add_argument("--seed", type=int, help="shuffle seed (default: from params)")
    p.add_argument("--workers", type=int, help="processes, 0 = one per core (default: from params)")
    p.add_argument("--on-bad-image", choices=["fail", "skip"], help="(default: from params)")
    p.add_argument(
        "--verify", choices=["markers", "decode"], help="check of each RGB JPEG (default: from params)"
    )
    args = p.parse_args()
    if args.source and args.output:
        shards = ShardConfig()  # standalone: params.yaml is neither needed nor read
        source, output = args.source, resolve_output(args.output, Path.cwd())
    else:
        cfg = _cli.config(args.params)
        shards = cfg.data.shards
        source, output = resolve(args.source or cfg.data.root), resolve_output(args.output or shards.output)

    write_shards(
        source,
        output,
        max_samples_per_shard=args.max_samples_per_shard or shards.max_samples_per_shard,
        max_bytes_per_shard=args.max_bytes_per_shard or shards.max_bytes_per_shard,
        seed=shards.seed if args.seed is None else args.seed,
        workers=shards.workers if args.workers is None else args.workers,
        on_bad_image=args.on_bad_image or shards.on_bad_image,
        verify=args.verify or shards.verify,
    )


if __name__ == "__main__":
    _cli.run(main, ShardError, LeaseHeld, OSError)
