"""DVC stage ``report``: comparison tables (Markdown, CSV) and an accuracy-against-MACs plot from MLflow."""

from __future__ import annotations

from pipeline.paths import repo_root, resolve
from stages import _cli

PARAMS = ["variants", "report"]


def main() -> None:
    p = _cli.parser(__doc__.splitlines()[0])
    p.add_argument("--results", default="results", help="folder of the train stages' <variant>.json")
    args = p.parse_args()
    cfg = _cli.config(args.params)

    from pipeline.report import build_report
    from pipeline.tracking import tracking_uri

    root = repo_root()
    out = resolve(cfg.report.output, root)
    build_report(root / args.results, list(cfg.variants), tracking_uri(root), out)
    print(f"report written to {out / 'comparison.md'}")


if __name__ == "__main__":
    from pipeline.report import ReportError

    _cli.run(main, ReportError)
