"""Loading published and project checkpoints through timm's pretrained path, with clear errors.

Every model of :mod:`pipeline.models` loads a file the timm way::

    timm.create_model("t2t_vit_14", pretrained=True,
                      pretrained_cfg_overlay=dict(file="81.5_T2T_ViT_14.pth.tar"))

The file may be any of:

* a release of the T2T-ViT authors (github.com/yitu-opensource/T2T-ViT): a dict with ``state_dict``
  and ``state_dict_ema`` (preferred, as timm does), an ``argparse.Namespace`` under ``args``,
  ``epoch``, ``arch`` and ``metric``; keys may start with ``module.``;
* a release of the DVT authors (github.com/blackfeather-wang/Dynamic-Vision-Transformer):
  ``model_state_dict`` in their layout (``less_less_token`` / ``less_token`` / ``normal_token``) plus
  the published curve (``flops``, ``anytime_classification``, ``dynamic_threshold``,
  ``budgeted_batch_classification``; :func:`read_dvt_published` returns those four);
* a timm-format state dict (``.pth`` or ``.safetensors``);
* this project's own ``checkpoint/model.pt`` (``{"model": ..., "config": ...}``).

Rules of every load: nothing pickled is executed (``weights_only=True``; only ``argparse.Namespace``
is allowed, as timm allows it); the position table is the checkpoint's, resized at another input size
the way the authors' ``resize_pos_embed`` does (bicubic on the grid, no antialiasing, class token
kept); a classifier of another class count is dropped and re-initialised. A wrong file fails with a
:class:`CheckpointError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "DVTPublished",
    "authors_dvt_names",
    "authors_t2t_names",
    "explain_load_errors",
    "make_filter",
    "project_names",
    "read_checkpoint",
    "read_dvt_published",
    "unwrap_state_dict",
]

#: The only non-tensor class a checkpoint may hold (timm's and the authors' training scripts store
#: their argparse options); anything else needs a global the safe unpickler refuses.
SAFE_GLOBALS = [argparse.Namespace]

#: Stage prefixes of the DVT authors' cascade, first (fewest tokens) to last.
DVT_STAGES = ("less_less_token", "less_token", "normal_token")

#: Published-curve entries of a DVT release.
DVT_RESULTS = ("flops", "anytime_classification", "dynamic_threshold", "budgeted_batch_classification")

#: Where a state dict sits in a checkpoint, in timm's order (EMA weights first), then the DVT layout.
_STATE_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "model_state_dict")

_SAVE_HINT = (
    "If you trust where the file comes from, re-save its tensors alone once (torch.load(path, "
    "weights_only=False), then torch.save of its state dict, or safetensors.torch.save_file) and load "
    "that copy"
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded into a model. The message names the file and says what to do."""


# ----------------------------------------------------------------------------------------------------
# Reading files


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - a damaged archive has no readable global list
        return []


def read_checkpoint(path: str | Path) -> Any:
    """The object stored in ``path``, read without executing pickled code.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``,
    allowing only ``argparse.Namespace``.

    Raises:
        CheckpointError: the file is missing or empty, damaged (truncated, not a checkpoint), or
            needs pickled classes the safe loader refuses (named, with the safe way out).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): download it again")
    damaged = (
        f"checkpoint {path} is damaged ({{}}): it is truncated or not a PyTorch checkpoint. "
        "Download it again and compare its sha256 with the one in docs/models.md"
    )
    if path.suffix == ".safetensors":
        import safetensors.torch

        try:
            return safetensors.torch.load_file(str(path))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(damaged.format(err)) from None
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise CheckpointError(damaged.format("its zip archive has no central directory"))
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = _unsafe_globals(path) or re.findall(r"GLOBAL ([\w.]+)", str(err))
        if names:
            listed = ", ".join(dict.fromkeys(names))
            raise CheckpointError(
                f"checkpoint {path} was refused: it needs pickled classes ({listed}) that could run code "
                f"when loaded, and only argparse.Namespace is allowed. {_SAVE_HINT}."
            ) from None
        raise CheckpointError(damaged.format(err)) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(damaged.format(reason)) from None


@contextlib.contextmanager
def explain_load_errors(pretrained: bool, overlay: Mapping[str, Any] | None) -> Iterator[None]:
    """Turn a failed read of ``overlay['file']`` inside timm into a :class:`CheckpointError`.

    timm reads the file before any filter runs and reports a missing file with an empty
    ``FileNotFoundError`` and a damaged one with torch's internal message; this re-reads the file
    safely and, if that fails too, raises the explanation instead.
    """
    try:
        yield
    except CheckpointError:
        raise
    except Exception:
        file = (overlay or {}).get("file")
        if not pretrained or not file:
            raise
        read_checkpoint(file)  # raises the CheckpointError that explains it, if the file is at fault
        raise


# ----------------------------------------------------------------------------------------------------
# Names


_PERFORMER_TO_PROJECT = (
    (re.compile(r"(attention\d)\.(kqv|proj)\."), r"\1.attn.\2."),
    (re.compile(r"(attention\d)\.w$"), r"\1.attn.random_features"),
    (re.compile(r"(attention\d)\.mlp\.0\."), r"\1.mlp.fc1."),
    (re.compile(r"(attention\d)\.mlp\.2\."), r"\1.mlp.fc2."),
)
_PERFORMER_TO_AUTHORS = (
    (re.compile(r"(attention\d)\.attn\.(kqv|proj)\."), r"\1.\2."),
    (re.compile(r"(attention\d)\.attn\.random_features$"), r"\1.w"),
    (re.compile(r"(attention\d)\.mlp\.fc1\."), r"\1.mlp.0."),
    (re.compile(r"(attention\d)\.mlp\.fc2\."), r"\1.mlp.2."),
)


def unwrap_state_dict(checkpoint: Any) -> dict[str, Any]:
    """The tensors of a checkpoint object: its EMA weights if present (as timm), else its weights."""
    if isinstance(checkpoint, Mapping):
        for key in _STATE_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    return {str(k).removeprefix("module."): v for k, v in dict(checkpoint).items()}


def _t2t_to_project(key: str) -> str:
    key = key.replace("tokens_to_token.", "patch_embed.")
    if key.startswith("patch_embed.attention"):
        for pattern, replacement in _PERFORMER_TO_PROJECT:
            key = pattern.sub(replacement, key)
    return key


def project_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename the authors' T2T-ViT or DVT tensors to this project's; other names pass unchanged.

    T2T-ViT: ``tokens_to_token.`` -> ``patch_embed.``, the Performer layer's ``kqv``/``proj``/``w``
    under ``attn`` (``w`` as ``random_features``), its ``mlp.0``/``mlp.2`` -> ``fc1``/``fc2``. DVT:
    stage ``less_less_token``/``less_token``/``normal_token`` -> ``stages.0/1/2``,
    ``feature_resuse_mlp`` -> ``reuse_mlp``, and stage k's ``relation_reuse_conv.0/2`` ->
    ``relation_adapters.{k-1}.mlp.fc1/fc2``.
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        stage, _, rest = key.partition(".")
        if stage in DVT_STAGES:
            index = DVT_STAGES.index(stage)
            conv = re.fullmatch(r"relation_reuse_conv\.(0|2)\.(weight|bias)", rest)
            if conv:
                layer = "fc1" if conv.group(1) == "0" else "fc2"
                key = f"relation_adapters.{index - 1}.mlp.{layer}.{conv.group(2)}"
            else:
                rest = rest.replace(".feature_resuse_mlp.", ".reuse_mlp.")
                key = f"stages.{index}.{_t2t_to_project(rest)}"
        else:
            key = _t2t_to_project(key)
        out[key] = value
    return out


def _t2t_to_authors(key: str, performer: bool) -> str:
    if key.startswith("patch_embed.") and not key.startswith("patch_embed.proj."):
        key = "tokens_to_token." + key.removeprefix("patch_embed.")
        if performer:
            for pattern, replacement in _PERFORMER_TO_AUTHORS:
                key = pattern.sub(replacement, key)
    return key


def authors_t2t_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """This project's T2T-ViT tensors under the T2T-ViT authors' names (inverse of :func:`project_names`)."""
    performer = any(key.endswith("random_features") for key in state_dict)
    return {_t2t_to_authors(key, performer): value for key, value in state_dict.items()}


def authors_dvt_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """This project's DVT cascade under the DVT authors' names (inverse of :func:`project_names`)."""
    performer = any(key.endswith("random_features") for key in state_dict)
    out = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"stages\.(\d+)\.(.*)", key)
        adapter = re.fullmatch(r"relation_adapters\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", key)
        if match:
            stage = DVT_STAGES[int(match.group(1))]
            rest = match.group(2).replace(".reuse_mlp.", ".feature_resuse_mlp.")
            key = f"{stage}.{_t2t_to_authors(rest, performer)}"
        elif adapter:
            stage = DVT_STAGES[int(adapter.group(1)) + 1]
            key = f"{stage}.relation_reuse_conv.{0 if adapter.group(2) == 'fc1' else 2}.{adapter.group(3)}"
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------
# DVT's published curve


@dataclass(frozen=True)
class DVTPublished:
    """What a DVT release stores beside its weights: the authors' own evaluation of the file."""

    flops: list[float]
    """GFLOPs of exiting at each stage."""
    anytime_classification: list[float]
    """Top-1 (%) of each exit on ImageNet val."""
    dynamic_threshold: list[list[float]]
    """Exit thresholds, one row per point of the budgeted curve."""
    budgeted_batch_classification: list[list[float]]
    """The published accuracy-vs-cost curve: [average GFLOPs per image, top-1 (%)]."""


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return float(value) if isinstance(value, int | float) else value


def read_dvt_published(path: str | Path) -> DVTPublished | None:
    """The four published-curve entries of a DVT release, or None if the file has none.

    Raises:
        CheckpointError: the file cannot be read safely.
    """
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, Mapping) or not all(key in checkpoint for key in DVT_RESULTS):
        return None
    return DVTPublished(**{key: _plain(checkpoint[key]) for key in DVT_RESULTS})


# ----------------------------------------------------------------------------------------------------
# Position tables and shape checks


def _stage_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    stages = getattr(model, "stages", None)
    if isinstance(stages, nn.ModuleList):
        return [(f"stages.{i}.", stage) for i, stage in enumerate(stages)]
    return [("", model)]


def adapt_pos_embeds(state_dict: dict[str, Any], model: nn.Module, source: str) -> None:
    """Resize every stored position table of another grid to the model's, in place.

    Bicubic on the token grid (assumed square, as the authors do), no antialiasing, class (and
    register) tokens kept: the authors' ``resize_pos_embed``. Each resize is logged.
    """
    for prefix, stage in _stage_models(model):
        key = prefix + "pos_embed"
        table, own = state_dict.get(key), getattr(stage, "pos_embed", None)
        if table is None or own is None or table.shape == own.shape:
            continue
        num_prefix = 0 if getattr(stage, "no_embed_class", False) else stage.num_prefix_tokens
        old_side = math.isqrt(table.shape[1] - num_prefix)
        grid = tuple(stage.patch_embed.grid_size)
        if old_side * old_side != table.shape[1] - num_prefix or table.shape[-1] != own.shape[-1]:
            continue  # not a table of this model: the shape check reports it
        state_dict[key] = resample_abs_pos_embed(
            table, list(grid), num_prefix_tokens=num_prefix, interpolation="bicubic", antialias=False
        )
        log.warning(
            "checkpoint %s: position table %s resized from %dx%d to %dx%d tokens (bicubic, class token "
            "kept): the checkpoint was made at %d px, the model is built for %d px",
            *(source, key, old_side, old_side, *grid),
            *(old_side * stage.patch_embed.patch_size[0], stage.patch_embed.img_size[0]),
        )


def _classifiers(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _checkpoint_classes(state_dict: Mapping[str, Any], model: nn.Module) -> int | None:
    for name in _classifiers(model):
        weight = state_dict.get(name + ".weight")
        if weight is not None:
            return int(weight.shape[0])
    return None


def _first(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def check_fits(state_dict: Mapping[str, Any], model: nn.Module, source: str) -> None:
    """Raise if ``state_dict`` is not ``model``'s architecture (the classifier may differ).

    Raises:
        CheckpointError: naming the file, the model the tensors look like, and the first missing,
            unexpected and mis-shaped tensors.
    """
    own = model.state_dict()
    skip = {f"{name}.{p}" for name in _classifiers(model) for p in ("weight", "bias")}
    missing = [k for k in own if k not in state_dict and k not in skip]
    unexpected = [k for k in state_dict if k not in own and k not in skip]
    shaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and k not in skip and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or shaped):
        return
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
    parts = [f"checkpoint {source} does not fit {name}"]
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing from it (first: {_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {_first(unexpected)})")
    if shaped:
        parts.append(f"{len(shaped)} of another shape (first: {_first(shaped, 3)})")
    guess = closest_model(state_dict)
    if guess is not None and guess[0] != name:
        parts.append(
            f"its tensors look like {guess[0]} ({guess[1]} of {guess[2]} names and shapes agree): "
            f"create that model instead, or check the depth/width arguments"
        )
    raise CheckpointError("; ".join(parts))


def _signature(state_dict: Mapping[str, Any]) -> set[tuple[str, tuple[int, ...]]]:
    return {
        (k, tuple(v.shape))
        for k, v in state_dict.items()
        if hasattr(v, "shape") and not k.endswith(("pos_embed", "head.weight", "head.bias"))
    }


@functools.cache
def _model_signature(name: str) -> frozenset[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a registered model at its defaults, built on ``meta`` without init."""
    import timm

    with torch.device("meta"):
        try:
            model = timm.create_model(name, weight_init="skip")
        except TypeError:
            model = timm.create_model(name)
    return frozenset(_signature(model.state_dict()))


def _family(keys: set[str], name: str) -> bool:
    """Whether model ``name`` is of the kind the checkpoint's names show (cascade, T2T or plain ViT)."""
    if any(k.startswith("stages.") for k in keys):
        return name.startswith("dvt_")
    if any(k.startswith("patch_embed.attention") for k in keys):
        return name.startswith("t2t_vit")
    return not name.startswith(("dvt_", "t2t_vit"))


def closest_model(state_dict: Mapping[str, Any]) -> tuple[str, int, int] | None:
    """The registered model whose tensors best match ``state_dict``'s (names and shapes; position
    tables and heads ignored): (name, agreeing tensors, tensors in the checkpoint)."""
    from pipeline.zoo import registered_models

    wanted = _signature(state_dict)
    keys = {k for k, _ in wanted}
    best: tuple[float, str, int] | None = None
    for name in registered_models():
        if not _family(keys, name):
            continue
        try:
            candidate = _model_signature(name)
        except Exception:  # noqa: BLE001, S112 - a model that cannot be built at its defaults is no guess
            continue
        agree = len(wanted & candidate)
        score = agree / max(len(wanted | candidate), 1)
        if best is None or score > best[0]:
            best = (score, name, agree)
    return None if best is None or best[2] == 0 else (best[1], best[2], len(wanted))


# ----------------------------------------------------------------------------------------------------
# The filter timm calls


def make_filter(
    base: Callable[[dict[str, Any], nn.Module], dict[str, Any]] | None = None,
) -> Callable[[dict[str, Any], nn.Module], dict[str, Any]]:
    """A ``pretrained_filter_fn`` for ``build_model_with_cfg`` that applies every rule of this module.

    The returned function unwraps the checkpoint (EMA first), renames the authors' tensors, resizes
    stored position tables to the model's grid, records the checkpoint's class count in the model's
    ``pretrained_cfg`` (so timm drops a classifier of another size and keeps one of the same), applies
    ``base`` (e.g. timm's ViT filter) and checks the architecture.

    Args:
        base: A further filter run after renaming and resizing.
    """

    def filter_fn(state_dict: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        source = str(cfg.get("file") or cfg.get("url") or "<state dict>")
        tensors = project_names(unwrap_state_dict(state_dict))
        tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        adapt_pos_embeds(tensors, model, source)
        if base is not None:
            tensors = base(tensors, model)
        classes = _checkpoint_classes(tensors, model)
        if classes is not None and isinstance(cfg, dict):
            cfg["num_classes"] = classes  # timm compares this with the model's to keep or drop the head
            if classes != getattr(model, "num_classes", classes):
                log.info(
                    "checkpoint %s: classifier of %d classes dropped, re-initialised for %d",
                    *(source, classes, model.num_classes),
                )
        check_fits(tensors, model, source)
        return tensors

    return filter_fn
