"""DVC stage ``report``: the study's tables, figures and HTML page (reports/) from the results and MLflow.

Reads ``results/<variant>.json`` of every variant in params and ``results/dvt/<cascade>/`` (the
tune_dvt stages), fetches each named MLflow run, and writes Markdown/CSV/parquet tables, PNG/SVG figures,
``metrics.json`` and the self-contained ``index.html`` (docs/report.md). Run links in the page point
at ``MLFLOW_UI_URL`` (default http://127.0.0.1:5000, where ``./run ui`` serves).
"""

from __future__ import annotations

from pipeline.paths import repo_root, resolve
from stages import _cli

PARAMS = ["variants", "dvt.variants", "report"]


def main() -> None:
    p = _cli.parser(__doc__.splitlines()[0])
    p.add_argument("--results", default="results", help="folder of the train stages' <variant>.json")
    args = p.parse_args()
    cfg = _cli.config(args.params)

    from pipeline.report import build_report
    from pipeline.tracking import check_tracking, tracking_uri

    root = repo_root()
    uri = tracking_uri(root)
    check_tracking(uri)
    out = resolve(cfg.report.output, root)
    build_report(
        root / args.results, list(cfg.variants), uri, out, cascades=cfg.dvt.variants, epoch=cfg.report.epoch
    )
    print(f"report written to {out / 'index.html'}")


if __name__ == "__main__":
    from pipeline.report import ReportError
    from pipeline.tracking import TrackingUnavailable

    _cli.run(main, ReportError, TrackingUnavailable)
