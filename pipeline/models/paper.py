"""The published numbers this project checks its models against, in one place.

Sources:

* Yuan et al., "Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet",
  arXiv:2101.11986 (ICCV 2021): parameters, MACs and ImageNet top-1 of T2T-ViT, its baselines
  (ViT, arXiv:2010.11929; DeiT, arXiv:2012.12877) and its "From CNN to ViT" variants.
* The authors' repository, github.com/yitu-opensource/T2T-ViT: its README's table of released
  models gives the ImageNet top-1 of every T2T-ViT and T2T-ViT_t variant (the paper prints only
  some); its code gives the exact parameter counts, and the MACs recounted over it under the
  all-matmul convention with ``torch.utils.flop_counter.FlopCounterMode``.

Every ``top1`` names where it is printed (``top1_source``). Fields left ``None`` are not given by
those sources; docs/models.md tabulates all of them. ``tests/test_models.py``,
``tests/test_cost.py`` and ``tests/test_variants.py`` check the models against ``params_all``,
``params_trainable`` and ``macs_g_all_matmul``; ``python -m pipeline.zoo`` tabulates every model
against this dict.
"""

from __future__ import annotations

from typing import TypedDict

__all__ = ["PAPER", "README", "T2T_PAPER", "PaperEntry"]

#: The T2T-ViT paper.
T2T_PAPER = "arXiv:2101.11986"
#: The authors' README, its table of released T2T-ViT models (ImageNet-1k val, their evaluation).
README = "github.com/yitu-opensource/T2T-ViT README"


class PaperEntry(TypedDict):
    """One row: a registered model at one input size."""

    model: str
    """Name registered in timm."""
    img_size: int
    """Input side the numbers are for."""
    params_m: float | None
    """Parameters in millions, as the paper prints them."""
    macs_g: float | None
    """GMACs as the final (ICCV) paper and README print them (all-matmul, rounded)."""
    macs_g_early: float | None
    """GMACs of the first arXiv version where they differ (a counting script the authors dropped)."""
    macs_g_all_matmul: float | None
    """All-matmul GMACs recounted over the authors' code: what ``count_macs`` measures."""
    top1: float | None
    """ImageNet-1k top-1 (%) trained from scratch."""
    top1_source: str | None
    """Where ``top1`` is printed: :data:`T2T_PAPER`, :data:`README` or both."""
    params_all: int | None
    """Exact count of every tensor of the authors' code, frozen position table and features included."""
    params_trainable: int | None
    """Exact count of the trainable tensors of the authors' code."""


def _entry(
    model: str,
    *,
    img_size: int = 224,
    params_m: float | None = None,
    macs_g: float | None = None,
    macs_g_early: float | None = None,
    macs_g_all_matmul: float | None = None,
    top1: float | None = None,
    top1_source: str | None = None,
    params_all: int | None = None,
    params_trainable: int | None = None,
) -> PaperEntry:
    if (top1 is None) != (top1_source is None):
        raise ValueError(f"{model}: a top-1 needs its source and a source its top-1")
    return PaperEntry(
        model=model,
        img_size=img_size,
        params_m=params_m,
        macs_g=macs_g,
        macs_g_early=macs_g_early,
        macs_g_all_matmul=macs_g_all_matmul,
        top1=top1,
        top1_source=top1_source,
        params_all=params_all,
        params_trainable=params_trainable,
    )


# fmt: off
#: Where a number is printed in both the paper and the README.
_BOTH = f"{T2T_PAPER}; {README}"

#: Published numbers keyed by registered model name (``@384`` marks the 384x384 evaluation),
#: one row per model like the paper's tables.
PAPER: dict[str, PaperEntry] = {
    "t2t_vit_7": _entry(
        "t2t_vit_7", params_m=4.2, macs_g=1.1, macs_g_early=1.2, macs_g_all_matmul=1.147,
        top1=71.7, top1_source=README, params_all=4_310_222, params_trainable=4_255_694,
    ),
    "t2t_vit_10": _entry(
        "t2t_vit_10", macs_g=1.5, macs_g_all_matmul=1.516,
        top1=75.2, top1_source=README, params_all=5_889_230, params_trainable=5_834_702,
    ),
    "t2t_vit_12": _entry(
        "t2t_vit_12", params_m=6.8, macs_g=1.8, macs_g_early=2.2, macs_g_all_matmul=1.763,
        top1=76.5, top1_source=README, params_all=6_941_902, params_trainable=6_887_374,
    ),
    "t2t_vit_14": _entry(
        "t2t_vit_14", params_m=21.5, macs_g=4.8, macs_g_early=5.2, macs_g_all_matmul=4.783,
        top1=81.5, top1_source=_BOTH, params_all=21_545_550, params_trainable=21_465_806,
    ),
    "t2t_vit_14@384": _entry(
        "t2t_vit_14", img_size=384, params_m=21.5, macs_g=17.1, macs_g_all_matmul=16.4,
        top1=83.3, top1_source=_BOTH, params_all=21_691_470, params_trainable=21_465_806,
    ),
    "t2t_vit_19": _entry(
        "t2t_vit_19", params_m=39.2, macs_g=8.5, macs_g_early=8.9, macs_g_all_matmul=8.480,
        top1=81.9, top1_source=README, params_all=39_177_422, params_trainable=39_085_070,
    ),
    "t2t_vit_24": _entry(
        "t2t_vit_24", params_m=64.1, macs_g=13.8, macs_g_early=14.1, macs_g_all_matmul=13.662,
        top1=82.3, top1_source=_BOTH, params_all=64_105_934, params_trainable=64_000_974,
    ),
    "t2t_vit_t_14": _entry(
        "t2t_vit_t_14", params_m=21.5, macs_g=6.1, macs_g_all_matmul=6.089,
        top1=81.7, top1_source=README, params_all=21_541_070, params_trainable=21_465_422,
    ),
    "t2t_vit_t_19": _entry(
        "t2t_vit_t_19", macs_g=9.8, macs_g_all_matmul=9.785,
        top1=82.4, top1_source=README, params_all=39_172_942, params_trainable=39_084_686,
    ),
    "t2t_vit_t_24": _entry(
        "t2t_vit_t_24", macs_g=15.0, macs_g_all_matmul=14.967,
        top1=82.6, top1_source=README, params_all=64_101_454, params_trainable=64_000_590,
    ),
    # Baselines, as the T2T-ViT paper prints them. Every tensor of a ViT is trainable, so only "all"
    # is given.
    "vit_s16_paper": _entry(
        "vit_s16_paper", params_m=48.6, macs_g=10.1, top1=78.1, top1_source=T2T_PAPER, params_all=48_754_408,
    ),
    # 86.8 M in the architecture table, 86.4 M in the accuracy table.
    "vit_b16_paper": _entry("vit_b16_paper", params_m=86.8, macs_g=17.6, top1=79.8, top1_source=T2T_PAPER),
    "vit_l16_paper": _entry("vit_l16_paper", params_m=304.3, macs_g=63.6, top1=81.1, top1_source=T2T_PAPER),
    "deit_small_paper": _entry(
        "deit_small_paper", params_m=22.1, macs_g=4.6, macs_g_all_matmul=4.599,
        top1=79.9, top1_source=T2T_PAPER, params_all=22_050_664,
    ),
    # "From CNN to ViT", T2T-ViT side: the authors' code exists, so exact counts and recounted MACs.
    # That table prints the first-version MACs (5.2 G for T2T-ViT-14); the README/ICCV ones are
    # macs_g. Wide's README/ICCV column reads "5.0 / 5.4" (two copies disagree); 5.4 is the table's.
    "t2t_vit_14_resnext": _entry(
        "t2t_vit_14_resnext", params_m=21.5, macs_g=4.8, macs_g_early=5.2, macs_g_all_matmul=4.783,
        top1=81.5, top1_source=T2T_PAPER, params_all=21_545_550, params_trainable=21_465_806,
    ),
    "t2t_vit_14_wide": _entry(
        "t2t_vit_14_wide", params_m=25.1, macs_g=5.0, macs_g_early=5.4, macs_g_all_matmul=5.229,
        top1=77.9, top1_source=T2T_PAPER, params_all=25_156_302, params_trainable=25_000_910,
    ),
    "t2t_vit_14_se": _entry(
        "t2t_vit_14_se", params_m=21.9, macs_g=4.9, macs_g_early=5.2, macs_g_all_matmul=4.784,
        top1=81.6, top1_source=T2T_PAPER, params_all=21_803_598, params_trainable=21_723_854,
    ),
    "t2t_vit_dense": _entry(
        "t2t_vit_dense", params_m=23.7, macs_g=5.5, macs_g_early=5.9, macs_g_all_matmul=5.276,
        top1=80.6, top1_source=T2T_PAPER, params_all=23_647_062, params_trainable=23_617_750,
    ),
    # The paper names it T2T-ViT-Ghost with depth 14; the code's model has depth 16.
    "t2t_vit_16_ghost": _entry(
        "t2t_vit_16_ghost", params_m=16.3, macs_g=3.7, macs_g_all_matmul=3.802,
        top1=79.5, top1_source=T2T_PAPER, params_all=16_253_262, params_trainable=16_173_518,
    ),
    # "From CNN to ViT", ViT side: no public code, so only the paper's printed (rounded) numbers.
    "vit_dn_paper": _entry("vit_dn_paper", params_m=24.5, macs_g=5.5, top1=79.0, top1_source=T2T_PAPER),
    "vit_sw_paper": _entry("vit_sw_paper", params_m=47.9, macs_g=9.9, top1=69.9, top1_source=T2T_PAPER),
    "vit_dense_paper": _entry("vit_dense_paper", params_m=46.7, macs_g=9.7, top1=76.8, top1_source=T2T_PAPER),
    "vit_se_paper": _entry("vit_se_paper", params_m=49.2, macs_g=10.2, top1=78.4, top1_source=T2T_PAPER),
    "vit_resnext_paper": _entry(
        "vit_resnext_paper", params_m=48.6, macs_g=10.1, top1=78.0, top1_source=T2T_PAPER,
    ),
    "vit_ghost_paper": _entry("vit_ghost_paper", params_m=32.1, macs_g=6.9, top1=73.7, top1_source=T2T_PAPER),
}
# fmt: on
