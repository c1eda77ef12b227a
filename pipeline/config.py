"""The study's one typed configuration, loaded from ``params.yaml``.

Every DVC stage loads the whole file through :func:`load_config` before it does any work, so a
misspelt key, a wrong type or an out-of-range value fails in under a second with a message that
names the key (``train.epochs: Input should be greater than 0``). Stages then read only the
sections they declare in ``dvc.yaml`` (see ``stages/*.py``'s ``PARAMS``; a test checks the two
agree).

The ``train`` section (:class:`TrainConfig`, :class:`AugmentConfig`) is defined in
:mod:`pipeline.config_train` and importable from here. This module imports nothing heavy (no torch,
Ray or MLflow) so validation stays fast.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from pipeline.config_base import ConfigError, _Section
from pipeline.config_train import AugmentConfig as AugmentConfig  # re-exported
from pipeline.config_train import TrainConfig, token_patch

#: Where the demo stage writes its images; ``data.root`` must point here when ``data.source`` is
#: ``demo`` (dvc.yaml wires the two stages together through this path).
DEMO_DIR = "data/demo"


class DemoConfig(_Section):
    """The synthetic data set generated when ``data.source`` is ``demo``."""

    num_classes: int = Field(10, ge=2, le=1000, description="Classes (one wnid folder each).")
    train_per_class: int = Field(200, ge=1, description="Training images per class.")
    val_per_class: int = Field(50, ge=1, description="Validation images per class.")
    image_size: int = Field(72, ge=32, le=512, description="Side of the generated JPEGs, in pixels.")
    seed: int = Field(0, ge=0, description="Same seed, same bytes.")


class ShardConfig(_Section):
    """How the ImageNet-layout folder becomes WebDataset tar shards."""

    output: str = Field(
        "data/shards",
        description="Where the tar shards, manifest and index go: a folder (relative to the repo or "
        "absolute) or an fsspec URI such as s3://bucket/imagenet-shards (docs/data.md).",
    )
    max_samples_per_shard: int = Field(
        256, ge=1, description="Samples per tar shard (the last may hold fewer)."
    )
    max_bytes_per_shard: int | None = Field(
        None,
        ge=1,
        description="Also cut a shard before it exceeds this many bytes, planned from file sizes "
        "(None: no byte limit).",
    )
    seed: int = Field(0, ge=0, description="Seed of the sample-to-shard shuffle.")
    workers: int = Field(
        2, ge=0, description="Processes writing shards, one shard each at a time (0: one per CPU core)."
    )
    verify: Literal["markers", "decode"] = Field(
        "markers",
        description="How an RGB JPEG kept verbatim is checked: 'markers' walks its marker structure "
        "(truncation, damaged headers; no pixels decoded, about 10x faster); 'decode' also decodes it "
        "at 1/8 scale. Both refused the same damaged copies in benchmarks/verify.py.",
    )
    on_bad_image: Literal["fail", "skip"] = Field(
        "fail",
        description="Empty, truncated or undecodable files: 'fail' stops the stage naming every one; "
        "'skip' leaves them out and lists them, with the reason, in the manifest.",
    )
    verify_sha256: bool = Field(
        False,
        description="The train, tune_dvt and evaluate stages check each shard's sha256 against the "
        "manifest the first time a process reads it to its end: changed bytes are an error naming the "
        "shard. Costs a sha256 of every shard's bytes as they are read, once per process (each epoch's "
        "DataLoader workers are new processes). The shard stage ignores it (docs/data.md).",
    )


class DataConfig(_Section):
    """Where the images come from."""

    source: Literal["demo", "folder"] = Field(
        "demo", description="'demo' generates a synthetic set; 'folder' reads an ImageNet-layout folder."
    )
    root: str = Field(DEMO_DIR, description=f"ImageNet-layout folder; must be {DEMO_DIR} for the demo.")
    demo: DemoConfig = DemoConfig()
    shards: ShardConfig = ShardConfig()

    @model_validator(mode="after")
    def _demo_root(self) -> DataConfig:
        if self.source == "demo" and Path(self.root) != Path(DEMO_DIR):
            raise ValueError(
                f"root is {self.root!r} but source is 'demo', which writes to {DEMO_DIR!r}: "
                f"set data.root: {DEMO_DIR} or data.source: folder"
            )
        return self


class VariantConfig(_Section):
    """One model to train: a timm model name plus optional overrides."""

    model: str = Field(description="A timm-registered model name (after `import pipeline.models`).")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to timm.create_model.")
    train: dict[str, Any] = Field(default_factory=dict, description="Overrides of the train section.")

    @field_validator("train")
    @classmethod
    def _known_train_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(TrainConfig.model_fields))
        if "seed" in unknown:
            raise ValueError(f"seed: replaced by seeds, a list: write seeds: [{value['seed']}]")
        if unknown:
            raise ValueError(
                f"unknown train override(s) {unknown}; valid keys: {sorted(TrainConfig.model_fields)}"
            )
        return value


class TrackingConfig(_Section):
    """MLflow. The tracking URI is not a param: it comes from MLFLOW_TRACKING_URI or the repo default."""

    experiment: str = Field("t2t-vit-study", min_length=1, description="MLflow experiment name.")


class ReportConfig(_Section):
    """The final comparison stage."""

    output: str = Field(
        "reports",
        description="Folder for tables and plots, inside the repository (the stage replaces files in it).",
    )
    epoch: Literal["last", "best"] = Field(
        "last",
        description="Which figure of each training the tables show: the last epoch's (the primary "
        "figure), or the best validation epoch's, which is chosen on the very data it is reported on "
        "(docs/report.md).",
    )

    @field_validator("output")
    @classmethod
    def _a_folder_of_its_own(cls, value: str) -> str:
        path = Path(value.strip())
        if not value.strip() or path == Path(".") or path == Path(path.anchor) or ".." in path.parts:
            raise ValueError(
                f"{value!r} is not a folder of its own: the report writes (and replaces) files there; "
                "use a new folder inside the repository, such as reports"
            )
        return value


class DVTConfig(_Section):
    """The ``tune_dvt`` stages (one per cascade): reuse ablation, exit thresholds, measured speed."""

    variants: list[str] = Field(
        min_length=1, description="Trained multi-exit variants (keys of variants) to tune; one stage each."
    )
    budget_gmacs: float | dict[str, float] = Field(
        description="Average MACs per image allowed, in G (all-matmul): one for every cascade, or one per "
        "cascade (a mapping from each of dvt.variants)."
    )
    backbones: dict[str, str] = Field(
        default_factory=dict,
        description="Cascade -> the static variant of the same backbone trained in this study (e.g. "
        "dvt_t2t_vit_12: t2t_vit_12): scored on the same images and timed beside the cascade.",
    )
    reuse_ablation: list[str] = Field(
        default_factory=list,
        description="Cascades (of dvt.variants) whose four reuse combinations are trained and compared.",
    )
    calibration: Literal["train", "val"] = Field(
        "train",
        description="Where the thresholds are calibrated: 'train' a seeded subset of the training split "
        "(evaluation transform), every validation image reported (the authors' protocol); 'val' a seeded "
        "part of the validation split, only the other part reported.",
    )
    calibration_images: int = Field(
        50_000, ge=1, description="Images calibrating the thresholds (the authors: 50,000 training images)."
    )
    seed: int = Field(0, ge=0, description="Seed of the calibration subset and the searches.")
    threshold_trials: int = Field(48, ge=1, description="Ray Tune (Optuna) trials over the thresholds.")
    reuse_epochs: int = Field(3, ge=1, description="Epochs per reuse-ablation trial.")
    reuse_steps_per_epoch: int | None = Field(
        None, gt=0, description="Cap on optimizer steps per reuse-trial epoch (None: full epochs)."
    )
    reuse_workers: int = Field(1, ge=1, description="Ray Train workers per reuse-ablation trial.")
    max_concurrent_trials: int = Field(2, ge=1)
    speed_batch: int = Field(128, ge=1, description="Batch of the throughput measurement (the paper's 128).")
    speed_repeats: int = Field(5, ge=1, description="Timed batches per measurement (the median is reported).")
    speed_warmup: int = Field(2, ge=0, description="Untimed batches before each measurement.")

    @model_validator(mode="after")
    def _cascades_consistent(self) -> DVTConfig:
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants {self.variants} repeat a cascade")
        for key, names in (("reuse_ablation", self.reuse_ablation), ("backbones", list(self.backbones))):
            stray = sorted(set(names) - set(self.variants))
            if stray:
                raise ValueError(f"{key} names {stray}, which are not in dvt.variants {self.variants}")
        if isinstance(self.budget_gmacs, dict):
            missing = sorted(set(self.variants) - set(self.budget_gmacs))
            if missing:
                raise ValueError(f"budget_gmacs gives no budget for {missing}")
            if any(v <= 0 for v in self.budget_gmacs.values()):
                raise ValueError("every budget_gmacs must be > 0")
        elif self.budget_gmacs <= 0:
            raise ValueError("budget_gmacs must be > 0")
        return self

    def budget_for(self, variant: str) -> float:
        """The budget of ``variant``, in GMACs."""
        if isinstance(self.budget_gmacs, dict):
            return float(self.budget_gmacs[variant])
        return float(self.budget_gmacs)


class PretrainedConfig(_Section):
    """One outside checkpoint for the ``evaluate`` stage (docs/models.md lists the published ones)."""

    model: str = Field(description="A timm-registered model name the checkpoint is for.")
    checkpoint: str = Field(
        description="A path (relative to the repo or absolute), an fsspec URI, an MLflow run "
        "(runs:/<id>/<artifact>, mlflow:<id>) or a training record results/<variant>.json."
    )
    img_size: int | None = Field(None, ge=16, description="Input side; None: the model's default (224).")
    crop_pct: float | None = Field(
        None, gt=0, le=1, description="Centre-crop fraction; None: the model's (T2T-ViT 0.9, DeiT 0.875)."
    )
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to timm.create_model.")
    export_authors_format: bool = Field(
        False,
        description="First write the checkpoint in the T2T-ViT authors' release format and evaluate that "
        "file (checks the conversion end to end; T2T-ViT models only).",
    )
    batch_size: int = Field(64, ge=1, description="Evaluation batch.")
    loader_workers: int = Field(0, ge=0, description="DataLoader processes.")
    holdout_fraction: float = Field(
        0.5, gt=0, lt=1, description="DVT: share of the images that calibrates the exit thresholds."
    )
    seed: int = Field(0, ge=0, description="DVT: seed of the calibration split.")


class StudyConfig(_Section):
    """Everything in params.yaml."""

    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    variants: dict[str, VariantConfig] = Field(description="Name -> model; one DVC train stage each.")
    dvt: DVTConfig
    tracking: TrackingConfig = TrackingConfig()
    report: ReportConfig = ReportConfig()
    pretrained: dict[str, PretrainedConfig] = Field(
        default_factory=dict, description="Name -> outside checkpoint; one DVC evaluate stage each."
    )

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value: dict[str, VariantConfig]) -> dict[str, VariantConfig]:
        if not value:
            raise ValueError("at least one variant is needed")
        for name in value:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"variant name {name!r} may hold only letters, digits, '_' and '-'")
        return value

    @model_validator(mode="after")
    def _dvt_variants_exist(self) -> StudyConfig:
        named = [("dvt.variants", v) for v in self.dvt.variants]
        named += [(f"dvt.backbones.{k}", v) for k, v in self.dvt.backbones.items()]
        for key, name in named:
            if name not in self.variants:
                raise ValueError(f"{key}: {name!r} is not a key of variants {sorted(self.variants)}")
        return self

    @model_validator(mode="after")
    def _overrides_valid(self) -> StudyConfig:
        for name in self.variants:
            try:
                self.train_for(name)
            except ValidationError as err:
                raise ValueError(
                    f"variants.{name}.train: {_format_errors(err, 'variants.' + name + '.train')}"
                ) from None
        return self

    @model_validator(mode="after")
    def _img_size_fits_the_models(self) -> StudyConfig:
        for name, variant in self.variants.items():
            patch = token_patch(variant.model, variant.model_kwargs)
            size = self.train_for(name).img_size
            if patch and size % patch:
                fits = sorted({max(patch, size // patch * patch), (size // patch + 1) * patch})
                raise ValueError(
                    f"variants.{name}: train.img_size {size} is not a multiple of {patch}, the patch "
                    f"{variant.model} cuts the image into (its tokens must tile the image): use "
                    + " or ".join(map(str, fits))
                )
        return self

    def train_for(self, variant: str) -> TrainConfig:
        """The train section with ``variants.<variant>.train`` overrides applied."""
        overrides = self.variants[variant].train
        if not overrides:
            return self.train
        merged = _deep_merge(self.train.model_dump(), overrides)
        return TrainConfig.model_validate(merged)


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_errors(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        key = f"{prefix}.{key}" if prefix and key else (prefix or key)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (misspelt? see the section's fields in pipeline/config.py)"
        lines.append(f"{key or '<root>'}: {msg}")
    return "; ".join(lines)


def parse_config(raw: Mapping[str, Any], source: str = "params.yaml") -> StudyConfig:
    """Validate a params mapping.

    Raises:
        ConfigError: naming ``source`` and every bad key.
    """
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid params: {_format_errors(err)}") from None


class _Yaml12Floats(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-3`` is a float as in YAML 1.2 (and DVC), not the string '1e-3'."""


_Yaml12Floats.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_config(path: str | Path = "params.yaml") -> StudyConfig:
    """Load and validate ``params.yaml``.

    Raises:
        ConfigError: the file is missing, is not YAML, or holds an invalid value.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file (run from the repository root or pass --params)")
    try:
        raw = yaml.load(path.read_text(), Loader=_Yaml12Floats) or {}  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    cfg = parse_config(raw, str(path))
    output = Path(cfg.report.output)
    if output.is_absolute() and output.resolve() == path.resolve().parent:
        raise ConfigError(
            f"{path}: invalid params: report.output: {cfg.report.output!r} is the repository root: "
            "the report writes (and replaces) files there; use a folder of its own, such as reports"
        )
    return cfg


def params_hash(*sections: Any) -> str:
    """A short stable hash of config sections, for run names and tags."""
    payload = [s.model_dump(mode="json") if isinstance(s, BaseModel) else s for s in sections]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
