"""The study's one typed configuration, loaded from ``params.yaml``.

Every DVC stage loads the whole file through :func:`load_config` before it does any work, so a
misspelt key, a wrong type or an out-of-range value fails in under a second with a message that
names the key (``train.epochs: Input should be greater than 0``). Stages then read only the
sections they declare in ``dvc.yaml`` (see ``stages/*.py``'s ``PARAMS``; a test checks the two
agree).

This module imports nothing heavy (no torch, Ray or MLflow) so validation stays fast.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

#: Where the demo stage writes its images; ``data.root`` must point here when ``data.source`` is
#: ``demo`` (dvc.yaml wires the two stages together through this path).
DEMO_DIR = "data/demo"


class ConfigError(ValueError):
    """params.yaml is invalid. The message names the file and every offending key."""


class _Section(BaseModel):
    """Base for every section: unknown keys are errors, values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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


class AugmentConfig(_Section):
    """Training augmentation, passed to timm. SPEC's ImageNet recipe is the ``imagenet`` profile."""

    scale_min: float = Field(0.08, gt=0, le=1, description="Lower bound of random-resized-crop scale.")
    hflip: float = Field(0.5, ge=0, le=1, description="Horizontal flip probability.")
    color_jitter: float = Field(0.4, ge=0, description="Colour jitter strength (unused with auto_augment).")
    auto_augment: str | None = Field(None, description="timm RandAugment string, e.g. rand-m9-mstd0.5-inc1.")
    re_prob: float = Field(0.0, ge=0, le=1, description="Random erasing probability.")
    mixup_alpha: float = Field(0.0, ge=0, description="Mixup Beta alpha (0 disables).")
    cutmix_alpha: float = Field(0.0, ge=0, description="CutMix Beta alpha (0 disables).")
    mixup_switch_prob: float = Field(0.5, ge=0, le=1, description="Chance of CutMix instead of mixup.")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Folded into the (soft) targets.")
    crop_pct: float = Field(
        0.9, gt=0, le=1, description="Evaluation: resize to img_size/crop_pct, centre crop."
    )
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    fast_decode: bool = Field(
        False,
        description="Decode JPEGs at a reduced DCT scale (PIL draft) when the crop or resize still "
        "gets at least its output size in pixels: faster, differs only by resampling (docs/data.md).",
    )


class TrainConfig(_Section):
    """The training recipe shared by every variant (a variant may override any field)."""

    img_size: int = Field(224, ge=16, description="Input side in pixels.")
    epochs: int = Field(310, gt=0, description="Epochs, cool-down included.")
    warmup_epochs: float = Field(5, ge=0, description="Linear warm-up from warmup_lr.")
    cooldown_epochs: int = Field(0, ge=0, description="Final epochs at min_lr (part of epochs).")
    batch_size: int = Field(512, gt=0, description="Global batch over all workers.")
    lr: float = Field(5e-4, gt=0, description="Peak learning rate (not scaled with batch size).")
    min_lr: float = Field(1e-5, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(0.05, ge=0, description="AdamW decay; none on norms, biases, tokens.")
    drop_path_rate: float = Field(0.1, ge=0, lt=1, description="Stochastic depth.")
    clip_grad: float | None = Field(None, gt=0, description="Gradient norm clip (None: off).")
    augment: AugmentConfig = AugmentConfig()
    max_batch_per_worker: int | None = Field(
        None, gt=0, description="Largest micro-batch a worker fits; larger shares use gradient accumulation."
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="EMA of the weights (None: off); "
        "when on, the EMA weights are the ones evaluated, as the authors do.",
    )
    amp: Literal["bf16", "off"] = Field("bf16", description="bf16 autocast on GPU (CPU always runs fp32).")
    compile: bool = Field(False, description="torch.compile the model.")
    channels_last: bool = Field(False, description="channels-last memory format for inputs and model.")
    checkpoint_every_steps: int = Field(
        0, ge=0, description="Also checkpoint every N steps (0: per epoch only)."
    )
    max_steps_per_epoch: int | None = Field(
        None, gt=0, description="Cap on optimizer steps per epoch (None: one full pass); for quick runs."
    )
    max_failures: int = Field(
        2, ge=-1, description="Worker-group restarts from the last checkpoint (-1: no limit)."
    )
    storage_path: str = Field(
        "runs/ray", description="Ray checkpoints: a folder every node sees, or an s3:// URI."
    )
    num_workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL; else CPU and gloo.")
    cpus_per_worker: float = Field(1, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    loader_workers: int = Field(0, ge=0, description="DataLoader processes per worker.")
    torch_threads: int = Field(1, ge=1, description="Intra-op threads per CPU worker.")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _fits(self) -> TrainConfig:
        if self.cooldown_epochs >= self.epochs:
            raise ValueError(f"cooldown_epochs ({self.cooldown_epochs}) must be < epochs ({self.epochs})")
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"batch_size ({self.batch_size}) must divide evenly over num_workers ({self.num_workers})"
            )
        share = self.batch_size // self.num_workers
        if share % self.accumulation:
            raise ValueError(
                f"the per-worker batch ({share}) must split into {self.accumulation} equal "
                f"micro-batches of at most max_batch_per_worker ({self.max_batch_per_worker})"
            )
        return self

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step: the smallest count that fits ``max_batch_per_worker``."""
        share = self.batch_size // self.num_workers
        if not self.max_batch_per_worker or share <= self.max_batch_per_worker:
            return 1
        return -(-share // self.max_batch_per_worker)


class VariantConfig(_Section):
    """One model to train: a timm model name plus optional overrides."""

    model: str = Field(description="A timm-registered model name (after `import pipeline.models`).")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to timm.create_model.")
    train: dict[str, Any] = Field(default_factory=dict, description="Overrides of the train section.")

    @field_validator("train")
    @classmethod
    def _known_train_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(TrainConfig.model_fields))
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

    output: str = Field("reports", description="Folder for tables and plots.")


class DVTConfig(_Section):
    """The ``tune_dvt`` stage: the reuse ablation and the exit thresholds for a MACs budget."""

    variant: str = Field(description="The trained multi-exit variant (a key of variants) to tune.")
    budget_gmacs: float = Field(gt=0, description="Average MACs per image allowed, in G (all-matmul).")
    holdout_fraction: float = Field(
        0.5, gt=0, lt=1, description="Share of the validation split that calibrates thresholds."
    )
    seed: int = Field(0, ge=0, description="Seed of the calibration split and the searches.")
    threshold_trials: int = Field(48, ge=1, description="Ray Tune (Optuna) trials over the thresholds.")
    reuse_epochs: int = Field(3, ge=1, description="Epochs per reuse-ablation trial.")
    reuse_steps_per_epoch: int | None = Field(
        None, gt=0, description="Cap on optimizer steps per reuse-trial epoch (None: full epochs)."
    )
    reuse_workers: int = Field(1, ge=1, description="Ray Train workers per reuse-ablation trial.")
    max_concurrent_trials: int = Field(2, ge=1)


class StudyConfig(_Section):
    """Everything in params.yaml."""

    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    variants: dict[str, VariantConfig] = Field(description="Name -> model; one DVC train stage each.")
    dvt: DVTConfig
    tracking: TrackingConfig = TrackingConfig()
    report: ReportConfig = ReportConfig()

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
    def _dvt_variant_exists(self) -> StudyConfig:
        if self.dvt.variant not in self.variants:
            raise ValueError(
                f"dvt.variant {self.dvt.variant!r} is not a key of variants {sorted(self.variants)}"
            )
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


def load_config(path: str | Path = "params.yaml") -> StudyConfig:
    """Load and validate ``params.yaml``.

    Raises:
        ConfigError: the file is missing, is not YAML, or holds an invalid value.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file (run from the repository root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return parse_config(raw, str(path))


def params_hash(*sections: Any) -> str:
    """A short stable hash of config sections, for run names and tags."""
    payload = [s.model_dump(mode="json") if isinstance(s, BaseModel) else s for s in sections]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
