"""The comparison stage: results files -> MLflow runs -> tables and a plot.

Rows come only from ``results/<variant>.json`` of the variants in the current params, each naming
its MLflow run id, so stale or unrelated runs in the same store never appear. Numbers are read
back from MLflow (the record of truth), not from the results files.

Counting conventions, stated in the table's header: parameters are all tensors (frozen ones
included); MACs are all matrix multiplications (every linear layer and both attention products)
at the training resolution, counted by tracing the forward pass with torch's FlopCounterMode.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

COLUMNS = ["variant", "model", "top1", "top5", "params_m", "macs_g", "images_per_s", "run_id"]


class ReportError(RuntimeError):
    """A results file or its MLflow run is missing; the message names which."""


@dataclass(frozen=True)
class Row:
    variant: str
    model: str
    top1: float
    top5: float
    params_m: float
    macs_g: float
    images_per_s: float
    run_id: str


def collect(results_dir: Path, variants: list[str], tracking_uri: str) -> list[Row]:
    """One row per variant, with metrics fetched from its MLflow run by id."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    rows = []
    for variant in variants:
        path = results_dir / f"{variant}.json"
        if not path.is_file():
            raise ReportError(f"{path} is missing: run the train@{variant} stage (dvc repro)")
        record = json.loads(path.read_text())
        try:
            run = client.get_run(record["run_id"])
        except MlflowException as err:
            raise ReportError(
                f"{path}: MLflow run {record['run_id']} not found at {tracking_uri} ({err}); "
                f"re-run train@{variant} or point MLFLOW_TRACKING_URI at the store that has it"
            ) from None
        m = run.data.metrics
        rows.append(
            Row(
                variant=variant,
                model=run.data.tags.get("model", record["model"]),
                top1=m["val_top1"],
                top5=m["val_top5"],
                params_m=m["params_m"],
                macs_g=m["macs_g"],
                images_per_s=m["images_per_s"],
                run_id=record["run_id"],
            )
        )
    return rows


def write_tables(rows: list[Row], out: Path) -> None:
    """``comparison.md``, ``comparison.csv`` and ``metrics.json`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "comparison.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
    lines = [
        "# T2T-ViT vs ViT: measured comparison",
        "",
        "Top-1/top-5 on the validation split after the last epoch. Params: all tensors, in millions. "
        "MACs: all matrix multiplications (linear layers and both attention products) at the training "
        "resolution, counted by tracing the forward pass (torch FlopCounterMode), in G. "
        "Images/s: training throughput of the last epoch over all workers.",
        "",
        "| Variant | Model | Top-1 (%) | Top-5 (%) | Params (M) | MACs (G) | Images/s | MLflow run |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.variant} | {r.model} | {r.top1:.2f} | {r.top5:.2f} | {r.params_m:.2f} | "
            f"{r.macs_g:.3f} | {r.images_per_s:.1f} | `{r.run_id}` |"
        )
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    metrics = {
        r.variant: {
            "top1": r.top1,
            "top5": r.top5,
            "params_m": r.params_m,
            "macs_g": r.macs_g,
            "images_per_s": r.images_per_s,
        }
        for r in rows
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def plot_accuracy_vs_macs(rows: list[Row], path: Path) -> None:
    """Top-1 against MACs, one labelled point per variant (the shape of the paper's Figure 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for r in rows:
        ax.scatter(r.macs_g, r.top1, s=40 + 4 * r.params_m)
        ax.annotate(r.variant, (r.macs_g, r.top1), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xlabel("MACs (G, all matmuls, at training resolution)")
    ax.set_ylabel("Validation top-1 (%)")
    ax.set_title("Accuracy against cost (marker area ~ parameters)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_report(results_dir: Path, variants: list[str], tracking_uri: str, out: Path) -> list[Row]:
    """Collect every variant's run and write the tables and the plot; returns the rows."""
    rows = collect(results_dir, variants, tracking_uri)
    write_tables(rows, out)
    plot_accuracy_vs_macs(rows, out / "accuracy_vs_macs.png")
    log.info("report: %d rows -> %s", len(rows), (out / "comparison.md").resolve())
    return rows
