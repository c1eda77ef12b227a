"""DVC stage ``tune_dvt@<variant>``: tune one trained DVT cascade, score it beside its backbone, time it.

Reads the trained cascade's ``results/<variant>.json`` (and its static backbone's, ``dvt.backbones``)
and their final weights logged to MLflow; calibrates the exit thresholds on the calibration images
(``dvt.calibration``), reports on the others, runs the reuse ablation when ``dvt.reuse_ablation``
names the cascade, measures images/s; writes ``results/dvt/<variant>/best.yaml`` (the record the
report reads), ``curve.csv`` and ``metrics.json`` (docs/dvt.md).
"""

from __future__ import annotations

import sys

from pipeline.paths import repo_root
from stages import _cli

PARAMS = ["dvt", "train", "data.shards.verify_sha256", "tracking", "variants.{variant}"]


def main() -> None:
    p = _cli.parser(__doc__.splitlines()[0])
    p.add_argument("--variant", required=True, help="the cascade to tune (one of dvt.variants)")
    p.add_argument("--results", default="results", help="folder of the train stages' <variant>.json")
    args = p.parse_args()
    cfg = _cli.config(args.params)
    if args.variant not in cfg.dvt.variants:
        sys.exit(f"error: {args.variant!r} is not in dvt.variants {cfg.dvt.variants} ({args.params})")
    root = repo_root()

    from pipeline.tracking import check_tracking, tracking_uri

    uri = tracking_uri(root)
    check_tracking(uri)  # before the heavy imports: an unreachable server fails in seconds

    from pipeline.dvt.study import tune_cascade, write_outputs

    results = root / args.results
    record = tune_cascade(cfg, args.variant, root=root, results=results, tracking_uri=uri)
    out = results / "dvt" / args.variant
    write_outputs(record, out)
    print(f"DVT tuning of {args.variant} written to {out}")


if __name__ == "__main__":
    from pipeline.tracking import TrackingUnavailable

    _cli.run(main, TrackingUnavailable, ValueError)
