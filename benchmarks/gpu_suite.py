"""The GPU path, measured in one call: training MFU, model speed, DVT early exit, the data path and a
real training smoke test, each part under a time limit of its own.

    python -m benchmarks.gpu_suite --out DIR            # one H100/H200: about 8 minutes at most
    python -m benchmarks.gpu_suite --out DIR --smoke    # any CPU: toy sizes, under a minute (CI)
    python -m benchmarks.gpu_suite --out DIR --parts d,e   # rerun some parts; the others are kept

Writes ``DIR/gpu_suite.json`` (every figure, raw) and ``DIR/gpu_suite.md`` (one table, also printed);
exits 1 if a part did not finish. ``--batch`` changes the per-GPU batch of parts a-d (128). The parts
are in :mod:`benchmarks.gpu_parts`; docs/performance.md ("GPU suite") says how to run the suite on a
GPU machine and what each figure decides.

Parts (GPU sizes; ``--smoke`` shrinks every model to one block of width 32 at 32 px, 64 px for DVT):

a. **Training MFU** of ``t2t_vit_14``, ``deit_small_paper`` (DeiT-S) and ``dvt_t2t_vit_12`` at 224 px,
   batch 128, bf16 autocast, AdamW: plain, + channels-last, + ``torch.compile``, both. MFU = images/s x
   all-matmul MACs (:func:`pipeline.models.count_macs`) x 3 (forward + backward) x 2 over the bf16
   matmul rate measured first on the same device (:func:`benchmarks.gpu_mfu.matmul_peak`).
b. **Model speed against the plain formulation** (:mod:`benchmarks.reference_attention`: explicit
   ``softmax(QK^T)V`` and the unfused Performer, same weights): forward + backward images/s in bf16,
   eager, for ``t2t_vit_14``, ``deit_small_paper`` and ``t2t_vit_t_14``; the two formulations' logits
   are compared in fp32 and in bf16.
c. **DVT early exit** (:func:`pipeline.dvt.early_exit`) of ``dvt_t2t_vit_12`` at batch 128, bf16, random
   weights, thresholds calibrated on the batch itself for 60/25/15 % exits, against "simulate" (every
   stage on every image) and the static ``t2t_vit_12`` and ``t2t_vit_14``; each measured speed-up is
   also given as a share of its MACs-ideal speed-up.
d. **The data path**: the project's shard reader, decoding and the ImageNet profile's training
   augmentation at 224 px with 16 loader processes, against (a)'s best training images/s; and JPEG
   decoding on the GPU (``torchvision.io.decode_jpeg``, batched) followed by random-resized crop, flip
   and normalisation on the GPU. Both are per GPU (the GPU machines have 16 cores per GPU).
e. **Training smoke test**: :func:`pipeline.train.loop.fit` through its ``LocalSession`` (no Ray),
   bf16 and ``torch.compile``, ``t2t_vit_7`` on a generated 10-class set, 2 epochs of 100 steps of 16
   images: the loss falls, a checkpoint written at step 100 and resumed gives the same step-101 loss,
   nothing is NaN.

(d) and (e) share 3,200 + 200 images the suite renders with :mod:`pipeline.demo_data` at 224 px and
shards with :func:`pipeline.shards.write_shards` in a scratch folder (removed at the end).

**Time limits.** Every part (and the data set-up) runs in a forked process of its own (its own process
group) under a wall-clock limit (``LIMITS``; ``--limit-scale`` multiplies them); a part past its
limit is killed with its children and recorded as timed out, keeping the rows it had already
written, and the next part starts. The limits sum to under 8 minutes on a GPU. The parent never
initialises CUDA, so that the forked parts can. Compilation is part of each part's time.

**Packages.** Parts a-c need torch, timm and numpy; d and e also import ``pipeline.config``
(pydantic) and read shards through webdataset. The GPU machines' image has torch, timm, torchvision,
numpy, Pillow, pyarrow, PyYAML, fsspec and tqdm, but neither pydantic nor webdataset; a part whose
packages are missing is recorded as skipped, naming them. Carry them as wheels (pure Python except
pydantic-core): here, ``benchmarks/gpu_wheels.sh`` downloads them into ``.whl/`` (git-ignored,
about 5 MB, for CPython 3.12 x86_64; it also takes the locked timm so the models build the same);
on the GPU machine, before the suite::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
        export PYTHONPATH=/tmp/site

**On the CPU** (``--smoke``) every part runs the same code at toy sizes, bf16 autocast on the CPU
(fp32 inside ``fit``, whose autocast is CUDA-only), ``torch.compile`` skipped (inductor's C++ build
takes minutes on a small CPU; the table says so) and 2 loader processes. Its figures only show that
the code runs; they are not performance figures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_parts import STEPS

PARTS = {
    "a": "Training MFU per speed flag",
    "b": "Model speed against the plain formulation",
    "c": "DVT early exit",
    "d": "Data path",
    "e": "Training smoke test (fit, LocalSession)",
}
#: Wall-clock limit (s) of each step on a GPU: 460 s together, under 8 minutes.
LIMITS = {"probe": 20, "data": 35, "a": 175, "b": 45, "c": 35, "d": 40, "e": 110}
#: The same on a CPU with --smoke (safety nets; every part takes seconds).
SMOKE_LIMITS = {"probe": 60, "data": 60, "a": 120, "b": 90, "c": 90, "d": 90, "e": 120}
#: Packages beyond torch/timm/numpy a part imports.
NEEDS = {"d": ("pydantic", "webdataset", "yaml"), "e": ("pydantic", "webdataset", "yaml")}

JSON_NAME, MD_NAME = "gpu_suite.json", "gpu_suite.md"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything that differs between a GPU run and a CPU smoke run."""

    img: int
    dvt_img: int
    batch: int
    warmup: int
    steps: int
    repeats: int
    rounds: int
    matmul_n: int
    model_kwargs: dict[str, Any]
    classes: int
    train_per_class: int
    val_per_class: int
    data_img: int
    loader_workers: int
    loader_batches: int
    fit_model: str
    fit_img: int
    fit_batch: int
    fit_steps: int
    compile: bool
    threads: int | None


GPU_SIZES = Sizes(
    img=224,
    dvt_img=224,
    batch=128,
    warmup=5,
    steps=20,
    repeats=10,
    rounds=3,
    matmul_n=8192,
    model_kwargs={},
    classes=10,
    train_per_class=320,
    val_per_class=20,
    data_img=224,
    loader_workers=16,
    loader_batches=96,
    fit_model="t2t_vit_7",
    fit_img=224,
    fit_batch=16,
    fit_steps=100,
    compile=True,
    threads=None,
)
SMOKE_SIZES = Sizes(
    img=32,
    dvt_img=64,
    batch=4,
    warmup=1,
    steps=1,
    repeats=1,
    rounds=1,
    matmul_n=128,
    model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2},
    classes=10,
    train_per_class=4,
    val_per_class=2,
    data_img=64,
    loader_workers=2,
    loader_batches=4,
    fit_model="t2t_vit_7",
    fit_img=32,
    fit_batch=4,
    fit_steps=5,
    compile=False,
    threads=1,
)


@dataclasses.dataclass
class Context:
    """What every part is given: sizes, device, scratch folder, and the results so far."""

    sizes: Sizes
    smoke: bool
    device_name: str
    scratch: Path
    results: dict[str, Any]

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_name)

    @property
    def shards(self) -> Path:
        return self.scratch / "shards"


class Recorder:
    """The rows of one part, rewritten to a JSON file after each, so a killed part keeps its rows."""

    def __init__(self, path: Path) -> None:
        self.path, self.rows, self.notes = path, [], []
        self.checks: dict[str, bool] = {}
        self.errors = 0

    def row(
        self, model: str, setting: str, result: str, goal: str = "", verdict: str = "", **data: Any
    ) -> None:
        """Record one figure: the table's display strings and, as keywords, the raw numbers."""
        table = {"model": model, "setting": setting, "result": result, "goal": goal, "verdict": verdict}
        self.rows.append({"table": table, **data})
        self.flush()
        print(f"  {model} | {setting} | {result} | {goal} | {verdict}", flush=True)

    def info(self, **data: Any) -> None:
        """Record facts that are not a figure of the table (device, data set)."""
        self.rows.append(data)
        self.flush()

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.flush()

    def flush(self, status: str = "running", error: str | None = None) -> None:
        body = {"status": status, "rows": self.rows, "notes": self.notes, "checks": self.checks}
        if error:
            body["error"] = error
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=1, default=float))
        tmp.replace(self.path)


# ------------------------------------------------------------------ running the parts


def _child(step: str, ctx: Context, path: Path) -> None:
    os.setsid()  # its own process group: a timeout kills its loader and compile workers too
    if ctx.sizes.threads:  # a small shared CPU: two OpenMP threads are many times slower than one
        torch.set_num_threads(ctx.sizes.threads)
    rec = Recorder(path)
    rec.flush()
    try:
        STEPS[step](ctx, rec)
    except BaseException:  # noqa: BLE001 - recorded and reported by the parent
        rec.flush("error", traceback.format_exc())
        os._exit(1)
    rec.flush(f"finished with {rec.errors} failed setting(s)" if rec.errors else "ok")
    os._exit(0)


def run_step(step: str, ctx: Context, limit: float) -> dict[str, Any]:
    """Run one step in a forked process group under ``limit`` seconds; its record, with status and time."""
    path = ctx.scratch / f"{step}.json"
    path.unlink(missing_ok=True)
    proc = mp.get_context("fork").Process(target=_child, args=(step, ctx, path), daemon=False)
    tic = time.perf_counter()
    proc.start()
    proc.join(limit)
    timed_out = proc.is_alive()
    if timed_out:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the part and whatever it started
        proc.kill()  # in case it had not reached its setsid yet
        proc.join()
    wall = time.perf_counter() - tic
    record = json.loads(path.read_text()) if path.exists() else {"status": "running", "rows": [], "notes": []}
    if timed_out:
        record["status"] = f"timed out after {limit:.0f} s"
    elif record["status"] == "running":  # died without a word (killed by the system, a crash in C)
        record["status"], record["error"] = "error", f"exited with code {proc.exitcode} before finishing"
    record.update(limit_s=limit, wall_s=round(wall, 1))
    return record


def _environment(smoke: bool) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "smoke": smoke,
    }
    for name in ("torch", "timm", "torchvision", "numpy", "pydantic", "webdataset"):
        try:
            env[name] = version(name)
        except PackageNotFoundError:
            env[name] = None
    if shutil.which("nvidia-smi"):  # a separate process: the parent itself must not initialise CUDA
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode == 0 and out.stdout.strip():
            env["gpu"], env["driver"] = (x.strip() for x in out.stdout.splitlines()[0].split(",", 1))
    return env


def _missing(step: str) -> list[str]:
    return [name for name in NEEDS.get(step, ()) if importlib.util.find_spec(name) is None]


def markdown(report: dict[str, Any]) -> str:
    """The suite's one table (with the machine above it and each part's notes and checks below)."""
    env = report["environment"]
    device = (
        env.get("gpu") or report.get("probe", {}).get("gpu") or f"CPU ({env['machine']}, {env['cpus']} cores)"
    )
    head = [
        f"GPU suite, {env['date']}: {device}"
        + (f", driver {env['driver']}" if env.get("driver") else "")
        + f"; torch {env['torch']}, timm {env['timm']}, Python {env['python']}, {env['cpus']} CPUs"
        + ("; **--smoke: toy sizes on the CPU, not performance figures**" if report["smoke"] else ""),
        "",
        "| Part | Model | Setting | Result | Goal / reference | Verdict |",
        "|---|---|---|---|---|---|",
    ]
    lines, notes = [], []
    for part, title in PARTS.items():
        record = report["parts"].get(part)
        if record is None:
            continue
        rows = record["rows"]
        if part == "a":  # measured flag by flag; shown model by model
            first = {r["table"]["model"]: i for i, r in reversed(list(enumerate(rows)))}
            rows = sorted(rows, key=lambda r: first[r["table"]["model"]])
        for row in rows:
            t = row["table"]
            lines.append(
                f"| {part} | {t.get('model', '')} | {t.get('setting', '')} | {t.get('result', '')} | "
                f"{t.get('goal', '')} | {t.get('verdict', '')} |"
            )
        if record["status"] != "ok":
            what = record["status"] + (
                f": {record['error'].strip().splitlines()[-1]}" if record.get("error") else ""
            )
            lines.append(f"| {part} | {title} | | **{what}** | | incomplete |")
        for name, passed in record.get("checks", {}).items():
            notes.append(f"- ({part}) check: {name}: {'passed' if passed else 'FAILED'}")
        notes += [f"- ({part}) {n}" for n in record.get("notes", [])]
        timing = f"{record['wall_s']} s of a {record['limit_s']:.0f} s limit"
        notes.append(f"- ({part}) {title}: {record['status']}, {timing}")
    return "\n".join(head + lines + ["", *notes]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_suite.json and gpu_suite.md")
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (CI); not performance figures")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of a,b,c,d,e")
    p.add_argument("--limit-scale", type=float, default=1.0, help="multiply every part's time limit")
    p.add_argument("--batch", type=int, help="per-GPU batch of parts a-d (default 128; 4 with --smoke)")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if unknown := [x for x in parts if x not in PARTS]:
        p.error(f"unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    limits = {k: v * args.limit_scale for k, v in (SMOKE_LIMITS if args.smoke else LIMITS).items()}
    previous = args.out / JSON_NAME
    report: dict[str, Any] = {"suite": "benchmarks.gpu_suite", "smoke": args.smoke, "parts": {}}
    if previous.exists():  # a rerun of some parts keeps the others' figures
        old = json.loads(previous.read_text())
        if old.get("smoke") == args.smoke:
            report["parts"] = {k: v for k, v in old.get("parts", {}).items() if k not in parts}
    report["environment"] = _environment(args.smoke)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    sizes = SMOKE_SIZES if args.smoke else GPU_SIZES
    ctx = Context(
        dataclasses.replace(sizes, batch=args.batch) if args.batch else sizes,
        args.smoke,
        "cpu" if args.smoke else "cuda",
        scratch,
        report["parts"],
    )
    try:
        print(f"GPU suite: parts {','.join(parts)}; scratch {scratch}", flush=True)
        probed = run_step("probe", ctx, limits["probe"])
        report["probe"] = probed["rows"][0] if probed["rows"] else {"error": probed.get("error")}
        data = None
        for part in parts:
            if probed["status"] != "ok":
                record = {**probed, "rows": [], "status": "skipped: the device probe failed"}
            elif missing := _missing(part):
                record = {
                    "status": f"skipped: missing {', '.join(missing)} (see the docstring: carry wheels)",
                    "rows": [],
                    "notes": [],
                    "limit_s": limits[part],
                    "wall_s": 0.0,
                }
            else:
                if part in "de" and data is None:
                    print("data set-up ...", flush=True)
                    data = run_step("data", ctx, limits["data"])
                    report["data"] = data
                if part in "de" and data["status"] != "ok":
                    record = {**data, "rows": [], "status": f"skipped: the data set-up {data['status']}"}
                else:
                    print(f"part {part}: {PARTS[part]} (limit {limits[part]:.0f} s)", flush=True)
                    record = run_step(part, ctx, limits[part])
            if record.get("error"):
                print(record["error"], file=sys.stderr, flush=True)
            report["parts"][part] = record
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["parts"] = {k: report["parts"][k] for k in PARTS if k in report["parts"]}
    table = markdown(report)
    previous.write_text(json.dumps(report, indent=1, default=float) + "\n")
    (args.out / MD_NAME).write_text(table)
    print(table)
    return 0 if all(report["parts"][k]["status"] == "ok" for k in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
