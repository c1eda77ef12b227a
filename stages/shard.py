"""DVC stage ``shard``: an ImageNet-layout folder to WebDataset tar shards, manifest and index.

Inside the pipeline it reads ``data.root`` and ``data.shards`` from params.yaml. Standalone, on any
folder and without touching params.yaml:

    python -m stages.shard --source /datasets/imagenet --output /fast/shards
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ShardConfig
from pipeline.paths import resolve
from pipeline.shards import ShardError, write_shards
from stages import _cli

PARAMS = ["data.root", "data.shards"]


def main() -> None:
    p = _cli.parser(__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, help="ImageNet-layout folder (default: data.root from params)")
    p.add_argument("--output", type=Path, help="output folder (default: data.shards.output from params)")
    p.add_argument("--max-samples-per-shard", type=int, help="samples per shard (default: from params)")
    p.add_argument("--seed", type=int, help="shuffle seed (default: from params)")
    args = p.parse_args()
    if args.source and args.output:
        shards = ShardConfig()  # standalone: params.yaml is neither needed nor read
        source, output = args.source, args.output
    else:
        cfg = _cli.config(args.params)
        shards = cfg.data.shards
        source, output = resolve(args.source or cfg.data.root), resolve(args.output or shards.output)
    write_shards(
        source,
        output,
        max_samples_per_shard=args.max_samples_per_shard or shards.max_samples_per_shard,
        seed=shards.seed if args.seed is None else args.seed,
    )


if __name__ == "__main__":
    _cli.run(main, ShardError, OSError)
