"""The ``train`` section of params.yaml: the training recipe every variant shares (:mod:`pipeline.config`
holds the whole file and re-exports these classes)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config_base import _Section


class AugmentConfig(_Section):
    """Training augmentation, passed to timm. The authors' ImageNet recipe is the ``imagenet`` profile."""

    scale_min: float = Field(0.08, gt=0, le=1, description="Lower bound of random-resized-crop scale.")
    hflip: float = Field(0.5, ge=0, le=1, description="Horizontal flip probability.")
    color_jitter: float = Field(0.4, ge=0, description="Colour jitter strength (unused with auto_augment).")
    auto_augment: str | None = Field(None, description="timm RandAugment string, e.g. rand-m9-mstd0.5-inc1.")
    re_prob: float = Field(0.0, ge=0, le=1, description="Random erasing probability.")
    re_mode: Literal["const", "rand", "pixel"] = Field(
        "const",
        description="Random erasing fill (timm's re_mode): 'const' zeros, 'rand' one random colour per "
        "box, 'pixel' random noise per pixel (the authors' --remode pixel).",
    )
    mixup_alpha: float = Field(0.0, ge=0, description="Mixup Beta alpha (0 disables).")
    cutmix_alpha: float = Field(0.0, ge=0, description="CutMix Beta alpha (0 disables).")
    mixup_switch_prob: float = Field(0.5, ge=0, le=1, description="Chance of CutMix instead of mixup.")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Folded into the (soft) targets.")
    crop_pct: float = Field(
        0.9, gt=0, le=1, description="Evaluation: resize to img_size/crop_pct, centre crop."
    )
    interpolation: Literal["bicubic", "bilinear"] = Field(
        "bicubic", description="Evaluation resize, and the training crop's unless train_interpolation is set."
    )
    train_interpolation: Literal["bicubic", "bilinear", "random"] | None = Field(
        None,
        description="Training random-resized-crop interpolation ('random': bilinear or bicubic per image, "
        "the authors' --train-interpolation random); None: the same as interpolation.",
    )
    fast_decode: bool = Field(
        False,
        description="Decode JPEGs at a reduced DCT scale (PIL draft) when the crop or resize still "
        "gets at least its output size in pixels: faster, differs only by resampling (docs/data.md).",
    )


class TrainConfig(_Section):
    """The training recipe shared by every variant (a variant may override any field)."""

    img_size: int = Field(224, ge=16, description="Input side in pixels.")
    epochs: int = Field(310, gt=0, description="Epochs, cool-down included.")
    warmup_epochs: float = Field(5, ge=0, description="Linear warm-up from warmup_lr (< epochs - cooldown).")
    cooldown_epochs: int = Field(0, ge=0, description="Final epochs at min_lr (part of epochs).")
    batch_size: int = Field(512, gt=0, description="Global batch over all workers.")
    lr: float = Field(5e-4, gt=0, description="Peak learning rate (not scaled with batch size).")
    min_lr: float = Field(1e-5, ge=0, description="End of the cosine and the cool-down's rate (<= lr).")
    lr_schedule_unit: Literal["epoch", "step"] = Field(
        "step",
        description="'epoch': the rate changes once per epoch, as the authors' timm 0.3.4 scheduler did; "
        "'step': after every optimizer step (a smoother curve, the same end points; docs/models.md).",
    )
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
        description="EMA of the weights (None: off). When on, both the raw and the EMA weights are "
        "evaluated every epoch (val_* and ema_val_* metrics); the EMA's is the reported figure and the "
        "one 'best' tracks, as the authors' timm script does.",
    )
    amp: Literal["bf16", "off"] = Field("bf16", description="bf16 autocast on GPU (CPU always runs fp32).")
    compile: bool = Field(False, description="torch.compile the model.")
    channels_last: bool = Field(False, description="channels-last memory format for inputs and model.")
    checkpoint_every_steps: int = Field(
        0, ge=0, description="Also checkpoint every N steps (0: per epoch only)."
    )
    log_every_steps: int = Field(
        50,
        ge=0,
        description="Print and log to MLflow the loss, learning rate, images/s and time left every N "
        "optimizer steps (0: only the 30-second heartbeat); a line comes at least every 30 s anyway.",
    )
    max_steps_per_epoch: int | None = Field(
        None, gt=0, description="Cap on optimizer steps per epoch (None: one full pass); for quick runs."
    )
    max_failures: int = Field(
        2, ge=-1, description="Worker-group restarts from the last checkpoint (-1: no limit)."
    )
    storage_path: str = Field(
        "runs/ray",
        min_length=1,
        pattern=r"\S",
        description="Ray checkpoints: a folder every node sees, or an s3:// URI.",
    )
    num_workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL; else CPU and gloo.")
    cpus_per_worker: float = Field(1, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    loader_workers: int = Field(0, ge=0, description="DataLoader processes per worker.")
    torch_threads: int = Field(1, ge=1, description="Intra-op threads per CPU worker.")
    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0],
        min_length=1,
        description="Train each variant once per seed (one MLflow run each); the report shows mean, std "
        "and n over them. The seed fixes initial weights, data order and augmentation.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_single_seed(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "seed" in data:
            raise ValueError(f"seed: replaced by seeds, a list: write seeds: [{data['seed']}]")
        return data

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds {value} repeat a seed: each seed would train the same run twice")
        return value

    @property
    def seed(self) -> int:
        """The seed of a single run: the runner trains each seed with a copy holding only it."""
        return self.seeds[0]

    def for_seed(self, seed: int) -> TrainConfig:
        """This recipe for one run of ``seed`` (``seeds`` becomes ``[seed]``)."""
        return self.model_copy(update={"seeds": [seed]})

    @model_validator(mode="after")
    def _fits(self) -> TrainConfig:
        if self.cooldown_epochs >= self.epochs:
            raise ValueError(f"cooldown_epochs ({self.cooldown_epochs}) must be < epochs ({self.epochs})")
        if self.warmup_epochs >= self.epochs - self.cooldown_epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be < epochs - cooldown_epochs "
                f"({self.epochs - self.cooldown_epochs}): the warm-up would never reach lr"
            )
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr}): the cosine would rise")
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


def token_patch(model: str, model_kwargs: Mapping[str, Any]) -> int | None:
    """The side in pixels of the image patch one token covers, by model family (None: unknown).

    A rule of the family instead of a built model keeps validation fast: ``patch_size`` from the
    kwargs or the name (``vit_tiny_patch16_224``), else 16 for T2T-ViT (soft-split strides 4, 2, 2),
    the paper's ViTs and DVT on T2T-ViT (its 14x14 stage), 32 for DVT on DeiT (its 7x7 stage).
    """
    if isinstance(model_kwargs.get("patch_size"), int):
        return int(model_kwargs["patch_size"])
    if match := re.search(r"patch(\d+)", model):
        return int(match.group(1))
    if model.startswith("dvt_deit"):
        return 32
    if model.startswith(("t2t_vit", "dvt_t2t")) or model.endswith("_paper"):
        return 16
    return None
