"""The papers' rows the report puts beside its measurements, and when a measurement may sit beside one.

The numbers come only from :data:`pipeline.models.paper.PAPER` and
:data:`pipeline.models.dvt.DVT_PAPER`; this module holds the tables' layout (which rows, in which
order, under which printed name). A measured variant is put beside a paper row when it trains the
paper's model: the same registered timm name and no ``model_kwargs`` changing its size. Demo-scale
variants (``vit_s16_paper`` with ``depth: 7``, say) are a different model, so their paper columns
read ``n/a (demo-scale)``. The paper's MACs are given for its input size (224 px unless noted); a
variant trained at another resolution gets the paper's parameters and top-1 beside it, not its MACs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.report.collect import Measured

DEMO_SCALE = "n/a (demo-scale)"

#: Readable names of the paper's rows (keys of PAPER / DVT_PAPER), as the papers print them.
PAPER_NAMES = {
    "vit_s16_paper": "ViT-S/16",
    "vit_b16_paper": "ViT-B/16",
    "vit_l16_paper": "ViT-L/16",
    "deit_small_paper": "DeiT-small",
    "t2t_vit_7": "T2T-ViT-7",
    "t2t_vit_10": "T2T-ViT-10",
    "t2t_vit_12": "T2T-ViT-12",
    "t2t_vit_14": "T2T-ViT-14",
    "t2t_vit_14@384": "T2T-ViT-14↑384",
    "t2t_vit_19": "T2T-ViT-19",
    "t2t_vit_24": "T2T-ViT-24",
    "t2t_vit_t_14": "T2T-ViT_t-14",
    "t2t_vit_t_19": "T2T-ViT_t-19",
    "t2t_vit_t_24": "T2T-ViT_t-24",
    "vit_dn_paper": "ViT-DN",
    "vit_sw_paper": "ViT-SW",
    "vit_dense_paper": "ViT-Dense",
    "vit_se_paper": "ViT-SE",
    "vit_resnext_paper": "ViT-ResNeXt",
    "vit_ghost_paper": "ViT-Ghost",
    "t2t_vit_14_wide": "T2T-ViT-Wide",
    "t2t_vit_dense": "T2T-ViT-Dense",
    "t2t_vit_14_se": "T2T-ViT-SE",
    "t2t_vit_14_resnext": "T2T-ViT-ResNeXt",
    "t2t_vit_16_ghost": "T2T-ViT-Ghost",
    "dvt_t2t_vit_12": "DVT-T2T-ViT-12",
    "dvt_t2t_vit_14": "DVT-T2T-ViT-14",
    "dvt_deit_small": "DVT-DeiT-S",
}

#: The rows of T2T-ViT's ImageNet table comparing it with ViT and DeiT, in the paper's order.
T2T_VS_VIT_ROWS = (
    "vit_s16_paper",
    "deit_small_paper",
    "t2t_vit_14",
    "t2t_vit_14@384",
    "vit_b16_paper",
    "vit_l16_paper",
    "t2t_vit_24",
)

#: T2T-ViT's "From CNN to ViT" table: (base, PAPER key, the CNN design carried over), paper's order.
CNN_TO_VIT_ROWS = (
    ("ViT", "vit_s16_paper", "baseline"),
    ("ViT", "vit_dn_paper", "deep-narrow"),
    ("ViT", "vit_sw_paper", "shallow-wide"),
    ("ViT", "vit_dense_paper", "dense connection (DenseNet)"),
    ("ViT", "vit_se_paper", "channel attention (SENet)"),
    ("ViT", "vit_resnext_paper", "more heads (ResNeXt)"),
    ("ViT", "vit_ghost_paper", "ghost operation (GhostNet)"),
    ("T2T-ViT", "t2t_vit_14", "baseline"),
    ("T2T-ViT", "t2t_vit_14_wide", "shallow-wide"),
    ("T2T-ViT", "t2t_vit_dense", "dense connection (DenseNet)"),
    ("T2T-ViT", "t2t_vit_14_se", "channel attention (SENet)"),
    ("T2T-ViT", "t2t_vit_14_resnext", "more heads (ResNeXt)"),
    ("T2T-ViT", "t2t_vit_16_ghost", "ghost operation (GhostNet)"),
)

#: T2T-ViT models whose top-1 only the authors' README prints (the paper's tables leave them out),
#: shown after the paper's own rows in the published table.
README_ONLY_ROWS = ("t2t_vit_7", "t2t_vit_10", "t2t_vit_12", "t2t_vit_19", "t2t_vit_t_14", "t2t_vit_t_19",
                    "t2t_vit_t_24")  # fmt: skip

#: What the paper-top-1 cell of a DVT cascade says: the DVT paper publishes a curve, not one number.
DVT_TOP1 = "a curve: see the DVT tables"


@dataclass(frozen=True)
class PaperRow:
    """A published row: which one, and its numbers (None where the paper gives none)."""

    key: str
    name: str
    img_size: int
    top1: float | None
    params_m: float | None
    macs_g: float | None
    top1_source: str | None = None
    """Where ``top1`` is printed (the paper, the authors' README, or both)."""


def paper_row(key: str) -> PaperRow:
    """The published numbers of a PAPER or DVT_PAPER key (DVT: the whole cascade at 224 px)."""
    from pipeline.models.dvt import DVT_PAPER
    from pipeline.models.paper import PAPER

    if key in DVT_PAPER:
        entry = DVT_PAPER[key]
        return PaperRow(
            key,
            PAPER_NAMES.get(key, key),
            224,
            None,
            entry["params_all"] / 1e6,
            round(sum(entry["stage_macs_g"]), 3),
        )
    e = PAPER[key]
    return PaperRow(
        key, PAPER_NAMES.get(key, key), e["img_size"], e["top1"], e["params_m"], e["macs_g"], e["top1_source"]
    )


def paper_key_for(model: str, img_size: int | None) -> str | None:
    """The paper's row of a registered model: at the training resolution if published, else 224 px."""
    from pipeline.models.dvt import DVT_PAPER
    from pipeline.models.paper import PAPER

    if model in DVT_PAPER:
        return model
    keys = [k for k, e in PAPER.items() if e["model"] == model]
    at_size = [k for k in keys if PAPER[k]["img_size"] == img_size]
    at_224 = [k for k in keys if PAPER[k]["img_size"] == 224]
    return (at_size or at_224 or [None])[0]


def paper_beside(m: Measured) -> tuple[dict[str, Any], dict[str, str]]:
    """The paper columns of a measured row, and the notes shown where a number is not comparable."""
    from pipeline.models.dvt import DVT_PAPER

    key = paper_key_for(m.model, m.img_size)
    empty = {
        "paper_model": None,
        "paper_img_size": None,
        "paper_top1": None,
        "paper_params_m": None,
        "paper_macs_g": None,
    }
    paper_cols = ("paper_top1", "paper_params_m", "paper_macs_g")
    if key is None:
        note = "not in the paper"
        return {**empty, "paper_note": note}, dict.fromkeys(paper_cols, note)
    if not m.paper_architecture:
        return (
            {**empty, "paper_model": key, "paper_note": f"{DEMO_SCALE}: {m.model} with {m.kwargs_text}"},
            dict.fromkeys(paper_cols, DEMO_SCALE),
        )
    p = paper_row(key)
    values = {
        "paper_model": key,
        "paper_img_size": p.img_size,
        "paper_top1": p.top1,
        "paper_params_m": p.params_m,
        "paper_macs_g": p.macs_g,
    }
    display, notes = {}, [f"paper: ImageNet-1k, {p.img_size} px"]
    if p.top1 is not None:
        notes.append(f"top-1 from {p.top1_source}")
    elif key in DVT_PAPER:
        display["paper_top1"] = DVT_TOP1
    else:
        display["paper_top1"] = "not published"
    if p.img_size != m.img_size:
        values["paper_macs_g"] = None
        display["paper_macs_g"] = f"n/a (paper at {p.img_size} px)"
        notes.append(f"MACs not comparable: trained at {m.img_size} px")
    return {**values, "paper_note": "; ".join(notes)}, display
