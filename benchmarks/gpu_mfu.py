"""Benchmark: per-GPU training images/s and model FLOPs utilisation (MFU) of one model, for the plain
bf16 loop and each speed flag, side by side in one process.

    python -m benchmarks.gpu_mfu [--model t2t_vit_14] [--img-size 224] [--batch 128] [--steps 30]

Each setting trains the same model (fresh weights, same seed) on synthetic data already on the
device (the data path is benchmarked elsewhere): AdamW through timm's optimizer factory, bf16
autocast, cross-entropy, ``--warmup`` untimed steps, then ``--steps`` timed ones between two
synchronisations. MFU = images/s x MACs x 3 (forward + backward) x 2 FLOPs per MAC, over the
device's measured bf16 matrix-multiply rate (the best of large square ``torch.matmul``s, printed
first). MACs are the all-matmul count of ``pipeline.models.count_macs`` at the input size.

Needs only torch and timm (the GPU machines' image has no Ray or MLflow). ``--device cpu`` runs the
same code in fp32 at toy sizes, for a smoke test.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F

FLAG_SETS = {
    "plain": {},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "compile + channels_last": {"compile": True, "channels_last": True},
}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 20) -> float:
    """The best measured FLOP/s of an n x n x n matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        _sync(device)
        tic = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - tic) / repeats)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(
    model_name: str,
    *,
    img_size: int,
    batch: int,
    steps: int,
    warmup: int,
    device: torch.device,
    channels_last: bool = False,
    compile: bool = False,
) -> float:
    """Training images/s of ``model_name`` with the given flags."""
    import timm
    from timm.optim import create_optimizer_v2

    import pipeline.models  # noqa: F401 - registers the study's models

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=1000, img_size=img_size).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = create_optimizer_v2(model, "adamw", lr=5e-4, weight_decay=0.05)
    net = torch.compile(model) if compile else model
    images = torch.randn(batch, 3, img_size, img_size, device=device).to(memory_format=fmt)
    labels = torch.randint(0, 1000, (batch,), device=device)
    use_bf16 = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = F.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _sync(device)
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - tic)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="t2t_vit_14")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128, help="per-GPU batch")
    p.add_argument("--steps", type=int, default=30, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation included)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--flags", nargs="+", choices=list(FLAG_SETS), default=list(FLAG_SETS))
    p.add_argument("--matmul-size", type=int, default=8192)
    args = p.parse_args()

    import timm

    from pipeline.models import count_macs

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        meta_model = timm.create_model(args.model, num_classes=1000, img_size=args.img_size)
    macs = count_macs(meta_model, args.img_size)
    peak = matmul_peak(device, dtype, n=args.matmul_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"device: {name} ({args.device}); torch {torch.__version__}; {os.cpu_count()} CPUs")
    print(f"measured {str(dtype).removeprefix('torch.')} matmul rate: {peak / 1e12:.1f} TFLOP/s "
          f"({args.matmul_size}^3); {args.model} at {args.img_size}px: {macs / 1e9:.3f} GMACs (all-matmul); "
          f"batch {args.batch}, {args.steps} timed steps after {args.warmup}")  # fmt: skip
    print("| flags | images/s | vs plain | MFU |")
    print("|---|---:|---:|---:|")
    base = None
    for flags in args.flags:
        rate = train_rate(args.model, img_size=args.img_size, batch=args.batch, steps=args.steps,
                          warmup=args.warmup, device=device, **FLAG_SETS[flags])  # fmt: skip
        base = base or rate
        mfu = rate * macs * 3 * 2 / peak
        print(f"| {flags} | {rate:.1f} | {rate / base:.2f}x | {100 * mfu:.1f} % |")


if __name__ == "__main__":
    main()
