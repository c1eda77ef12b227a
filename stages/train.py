"""DVC stage ``train@<variant>``: train one variant with Ray Train, tracked in MLflow.

Trains once per seed of ``train.seeds`` (one MLflow run each) and writes ``results/<variant>.json``
(the runs' ids and final metrics, with mean, std and n over the seeds). Uses a local Ray instance
unless ``RAY_ADDRESS`` is set, and ``sqlite:///<repo>/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is.
"""

from __future__ import annotations

import sys

from pipeline.paths import repo_root
from stages import _cli

# "variants.{variant}" is the variant's own section: dvc.yaml declares variants.${key}.
PARAMS = ["train", "data.shards.output", "data.shards.verify_sha256", "tracking", "variants.{variant}"]


def main() -> None:
    p = _cli.parser(__doc__.splitlines()[0])
    p.add_argument("--variant", required=True, help="a key of the variants section of params.yaml")
    p.add_argument("--results", default="results", help="folder for <variant>.json")
    args = p.parse_args()
    cfg = _cli.config(args.params)
    if args.variant not in cfg.variants:
        sys.exit(f"error: {args.params}: no variant {args.variant!r}; variants are {sorted(cfg.variants)}")

    from pipeline.tracking import check_tracking, tracking_uri

    root = repo_root()
    check_tracking(tracking_uri(root))  # before torch and Ray are imported: fails in seconds

    from pipeline.train.runner import train_variant

    train_variant(cfg, args.variant, root=root, results_dir=root / args.results)


if __name__ == "__main__":
    from pipeline.shards import ShardError
    from pipeline.storage import LeaseHeld
    from pipeline.tracking import TrackingUnavailable
    from pipeline.train.resume import CheckpointsKept

    _cli.run(main, ShardError, TrackingUnavailable, LeaseHeld, CheckpointsKept, ValueError)
