"""Benchmark: the shard stage's two checks of an RGB JPEG, ``markers`` (the default) and ``decode``,
side by side on the same files: microseconds per image, and how many damaged copies each refuses.

    python -m benchmarks.verify [--images DIR] [--count 400] [--seed 0]

Without ``--images`` it generates 400 JPEGs at 224 px (``pipeline.demo_data``). Damage, each kind
applied to every image (seeded): truncation at 30 %, 90 % and 99.9 % of the file, and 1, 5 or 20
random bytes overwritten inside the entropy-coded data. A check "refuses" a copy when
:func:`pipeline.imagenet.prepare_image` raises ``BadImage``.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import time
from pathlib import Path

from pipeline.imagenet import BadImage, prepare_image

MODES = ("markers", "decode")


def _damaged(data: bytes, kind: str, amount: float, rng: random.Random) -> bytes:
    if kind == "truncated":
        return data[: int(len(data) * amount)]
    out = bytearray(data)
    start = out.find(b"\xff\xda") + 20  # past the scan header: the entropy-coded data
    for _ in range(int(amount)):
        out[rng.randrange(start, len(out) - 2)] = rng.randrange(256)
    return bytes(out)


def _refuses(data: bytes, mode: str) -> bool:
    try:
        prepare_image(data, mode)
    except BadImage:
        return True
    return False


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=Path, help="a folder of JPEGs (searched recursively)")
    p.add_argument("--count", type=int, default=400, help="images to use")
    p.add_argument("--seed", type=int, default=0, help="of the damage")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        folder = args.images
        if folder is None:
            from pipeline.demo_data import generate_demo

            folder = Path(tmp)
            generate_demo(folder, num_classes=10, train_per_class=-(-args.count // 10), val_per_class=1,
                          image_size=224, seed=0, show_progress=False)  # fmt: skip
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in (".jpeg", ".jpg"))[: args.count]
        datas = [f.read_bytes() for f in files]

    cost = {}
    for mode in MODES:
        prepare_image(datas[0], mode)  # imports
        tic = time.perf_counter()
        for d in datas:
            prepare_image(d, mode)
        cost[mode] = (time.perf_counter() - tic) / len(datas) * 1e6
    damage = [("truncated", 0.3), ("truncated", 0.9), ("truncated", 0.999), ("bytes", 1), ("bytes", 5),
              ("bytes", 20)]  # fmt: skip
    rng = random.Random(args.seed)
    refused = {}
    for kind, amount in damage:
        copies = [_damaged(d, kind, amount, rng) for d in datas]
        refused[(kind, amount)] = {mode: sum(_refuses(c, mode) for c in copies) for mode in MODES}

    size = sum(map(len, datas)) / len(datas) / 1e3
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{len(datas)} JPEGs of {size:.1f} kB")  # fmt: skip
    print("| | markers | decode |")
    print("|---|---:|---:|")
    print(f"| µs per intact image | {cost['markers']:.0f} | {cost['decode']:.0f} |")
    for (kind, amount), counts in refused.items():
        what = f"truncated at {amount:.1%}" if kind == "truncated" else f"{amount} byte(s) overwritten"
        print(f"| refused: {what} | {counts['markers']} / {len(datas)} | {counts['decode']} / {len(datas)} |")


if __name__ == "__main__":
    main()
