"""DVC stage ``tune_dvt``: Ray Tune over DVT's reuse settings and its exit thresholds for a MACs budget.

Reads the trained cascade named by ``dvt.variant`` (its ``results/<variant>.json`` and the final
weights logged to MLflow), writes ``results/dvt/best.yaml`` (best reuse setting, thresholds of
both searches), ``results/dvt/curve.csv`` and ``curve.png`` (accuracy against average MACs) and
``results/dvt/metrics.json``.
"""

from __future__ import annotations

import json
import sys

from pipeline.paths import repo_root
from stages import _cli

PARAMS = ["dvt", "train", "tracking", "variants.{dvt_variant}"]


def main() -> None:
    p = _cli.parser(__doc__.splitlines()[0])
    p.add_argument("--results", default="results", help="folder of the train stages' <variant>.json")
    args = p.parse_args()
    cfg = _cli.config(args.params)
    root = repo_root()
    record_path = root / args.results / f"{cfg.dvt.variant}.json"
    if not record_path.is_file():
        sys.exit(f"error: {record_path} is missing: run train@{cfg.dvt.variant} first (dvc repro)")

    from pipeline.tracking import check_tracking, tracking_uri

    uri = tracking_uri(root)
    check_tracking(uri)  # before the heavy imports: an unreachable server fails in seconds

    from pipeline.tune import run_study, write_outputs

    record = json.loads(record_path.read_text())
    result, parent = run_study(cfg, record=record, root=root, tracking_uri=uri)
    out = root / args.results / "dvt"
    write_outputs(result, cfg, out, parent_run_id=parent)
    print(f"DVT tuning written to {out}")


if __name__ == "__main__":
    from pipeline.tracking import TrackingUnavailable

    _cli.run(main, TrackingUnavailable, ValueError)
