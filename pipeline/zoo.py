"""The model zoo table: every model ``pipeline.models`` registers, its cost, and the paper's numbers.

Run ``python -m pipeline.zoo [--out reports] [--img-size 224]`` to write ``zoo.md`` and ``zoo.csv``
under ``--out``. Models are built on the ``meta`` device (shapes only, no memory, no init), so the
whole table takes seconds on a laptop.

Counting conventions, stated in the Markdown header: parameters "all" are every tensor, including
T2T-ViT's frozen sinusoidal position table and the Performer's fixed random features; "trainable"
leaves those out. MACs are all matrix multiplications (every linear layer, both attention
products, the Performer's products, and the ghost layers' per-channel maps), counted by tracing
one forward pass with ``torch.utils.flop_counter.FlopCounterMode`` (docs/models.md). Deviations are
against the authors' code (github.com/yitu-opensource/T2T-ViT) where :data:`PAPER` holds its exact
counts (parameters to the unit, MACs recounted in the same convention), otherwise against the
paper's printed, rounded numbers.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import timm
import torch
from timm.models import model_entrypoint

import pipeline.models
from pipeline.models import PAPER, PaperEntry, count_macs, count_params

log = logging.getLogger(__name__)

_PACKAGE = pipeline.models.__name__ + "."


@dataclass(frozen=True)
class ZooRow:
    """One registered model measured at one input size, next to the published numbers."""

    model: str
    """Registered timm name."""
    family: str
    """Module of ``pipeline.models`` that registers it."""
    img_size: int
    """Input side the MACs (and the position table's share of the parameters) are for."""
    params_all: int
    """Every parameter tensor's elements, frozen ones included."""
    params_trainable: int
    """Elements of the trainable parameters."""
    macs_g: float
    """All-matmul GMACs of one image."""
    ref_params: int | None
    """Parameter count compared against: the authors' exact count, else the paper's millions x 1e6."""
    ref_params_source: str
    """``code`` (exact count of the authors' code), ``paper`` (printed, rounded to 0.1 M) or empty."""
    params_dev_pct: float | None
    """``(params_all - ref_params) / ref_params`` in percent."""
    ref_macs_g: float | None
    """GMACs compared against: the all-matmul recount, else the paper's printed figure."""
    ref_macs_source: str
    """``code`` (all-matmul recount over the authors' code) or ``paper`` (printed) or empty."""
    macs_dev_pct: float | None
    """``(macs_g - ref_macs_g) / ref_macs_g`` in percent."""
    paper_params_m: float | None
    """Parameters (M) as the paper prints them."""
    paper_macs_g: float | None
    """GMACs as the final paper / README print them."""
    paper_top1: float | None
    """ImageNet-1k top-1 (%) the paper or the authors' README reports."""
    paper_top1_source: str
    """Where ``paper_top1`` is printed (empty without one)."""


COLUMNS = [f.name for f in fields(ZooRow)]


#: Table order of the families (modules of ``pipeline.models``); others follow alphabetically.
FAMILY_ORDER = ("t2t_vit", "vit", "cnn_to_vit")


def _family(model: str) -> str:
    return model_entrypoint(model).__module__.removeprefix(_PACKAGE)


def registered_models() -> list[str]:
    """Every timm name whose entry function lives in ``pipeline.models``, grouped by family."""
    names = [name for name in timm.list_models() if model_entrypoint(name).__module__.startswith(_PACKAGE)]

    def order(name: str) -> tuple[int, str]:
        family = _family(name)
        return (FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER), family)

    # A stable sort keeps timm's natural order within a family (t2t_vit_7 before t2t_vit_10).
    return sorted(names, key=order)


def paper_entry(model: str, img_size: int) -> PaperEntry | None:
    """The :data:`PAPER` row for ``model`` at ``img_size``, if the paper gives one."""
    return next(
        (row for row in PAPER.values() if row["model"] == model and row["img_size"] == img_size), None
    )


def _deviation(measured: float, reference: float | None) -> float | None:
    return None if not reference else 100.0 * (measured - reference) / reference


def measure(model: str, img_size: int = 224) -> ZooRow:
    """Build ``model`` on the meta device and count its parameters and MACs at ``img_size``.

    Args:
        model: A registered timm name.
        img_size: Input side.

    Returns:
        The measured row with the paper's numbers and the deviations from them.
    """
    with torch.device("meta"):
        net = timm.create_model(model, img_size=img_size)
    params_all, params_trainable = count_params(net)
    macs_g = count_macs(net, img_size) / 1e9
    row = paper_entry(model, img_size)
    ref_params, ref_params_source, ref_macs, ref_macs_source = None, "", None, ""
    if row is not None:
        if row["params_all"] is not None:
            ref_params, ref_params_source = row["params_all"], "code"
        elif row["params_m"] is not None:
            ref_params, ref_params_source = round(row["params_m"] * 1e6), "paper"
        if row["macs_g_all_matmul"] is not None:
            ref_macs, ref_macs_source = row["macs_g_all_matmul"], "code"
        elif row["macs_g"] is not None:
            ref_macs, ref_macs_source = row["macs_g"], "paper"
    return ZooRow(
        model=model,
        family=_family(model),
        img_size=img_size,
        params_all=params_all,
        params_trainable=params_trainable,
        macs_g=macs_g,
        ref_params=ref_params,
        ref_params_source=ref_params_source,
        params_dev_pct=_deviation(params_all, ref_params),
        ref_macs_g=ref_macs,
        ref_macs_source=ref_macs_source,
        macs_dev_pct=_deviation(macs_g, ref_macs),
        paper_params_m=row["params_m"] if row else None,
        paper_macs_g=row["macs_g"] if row else None,
        paper_top1=row["top1"] if row else None,
        paper_top1_source=(row["top1_source"] or "") if row else "",
    )


def build_zoo(img_size: int = 224, models: Sequence[str] | None = None) -> list[ZooRow]:
    """Measure ``models`` (default: every registered one), logging progress.

    Args:
        img_size: Input side.
        models: Names to measure; None for :func:`registered_models`.

    Returns:
        One row per model, in the given order.
    """
    names = list(models) if models is not None else registered_models()
    rows = []
    for i, name in enumerate(names, 1):
        start = time.perf_counter()
        rows.append(measure(name, img_size))
        r = rows[-1]
        log.info(
            "[%d/%d] %s: %s params, %.3f GMACs (%.2f s)",
            i,
            len(names),
            name,
            f"{r.params_all:,}",
            r.macs_g,
            time.perf_counter() - start,
        )
    return rows


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def write_zoo(rows: Sequence[ZooRow], out: Path) -> tuple[Path, Path]:
    """Write ``zoo.csv`` (full precision) and ``zoo.md`` (rounded, with the conventions) under ``out``.

    Returns:
        The paths of the Markdown and CSV files.
    """
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "zoo.csv", out / "zoo.md"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})
    sizes = sorted({row.img_size for row in rows})
    lines = [
        "# Model zoo",
        "",
        f"Every model registered by `pipeline.models`, at {', '.join(f'{s}x{s}' for s in sizes)} "
        "(`python -m pipeline.zoo`).",
        "",
        "- **Params**: *all* counts every tensor, including T2T-ViT's frozen sinusoidal position table "
        "and the Performer's fixed random features; *trainable* leaves those out.",
        "- **MACs**: the **all-matmul** convention of the paper's final (ICCV) tables: every linear layer, "
        "both attention products (QK^T and AV), the Performer's products and the ghost layers' per-channel "
        "maps; not LayerNorm, softmax, GELU, unfold or additions. Counted by tracing one forward pass with "
        "torch's FlopCounterMode (FLOPs / 2), in G.",
        "- **Reference**: `code` = the authors' released code (exact parameter count; MACs recounted in the "
        "same convention, docs/models.md); `paper` = the paper's printed numbers (parameters rounded to "
        "0.1 M; its ViT MACs run about 2 % above the all-matmul count, e.g. ViT-S/16 10.1 G vs 9.889 G). "
        "Δ = measured vs reference.",
        "- **Paper top-1**: ImageNet-1k, from the T2T-ViT paper (arXiv:2101.11986) or, for the T2T-ViT "
        "models it leaves out, the authors' README (github.com/yitu-opensource/T2T-ViT); the CSV's "
        "`paper_top1_source` says which.",
        "",
        "| Model | Family | Params (all) | Params (trainable) | MACs (G) | Ref. params | Δ params | "
        "Ref. MACs (G) | Δ MACs | Ref. | Paper params (M) | Paper MACs (G) | Paper top-1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        source = "/".join(dict.fromkeys(s for s in (r.ref_params_source, r.ref_macs_source) if s))
        lines.append(
            f"| `{r.model}` | {r.family} | {r.params_all:,} | {r.params_trainable:,} | {r.macs_g:.3f} | "
            f"{_fmt(r.ref_params, ',')} | {_fmt(r.params_dev_pct, '+.2f', ' %')} | "
            f"{_fmt(r.ref_macs_g, '.3f')} | {_fmt(r.macs_dev_pct, '+.2f', ' %')} | {source} | "
            f"{_fmt(r.paper_params_m, '.1f')} | {_fmt(r.paper_macs_g, '.1f')} | {_fmt(r.paper_top1, '.1f')} |"
        )
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: measure every registered model and write the zoo table."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.zoo",
        description="Tabulate every model registered by pipeline.models: parameters, all-matmul MACs, "
        "and the paper's numbers (zoo.md, zoo.csv).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("reports"), help="folder for zoo.md and zoo.csv")
    parser.add_argument("--img-size", type=int, default=224, help="input side the MACs are counted at")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    rows = build_zoo(args.img_size)
    md_path, csv_path = write_zoo(rows, args.out)
    log.info("wrote %s and %s (%d models)", md_path, csv_path, len(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
