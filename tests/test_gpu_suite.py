"""The GPU suite on the CPU (its --smoke run, the time limits, the reference formulation), and the
GPU image's constraint: the models, DVT and the training loop import without Ray, MLflow or DVC."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
#: Run before anything else in a subprocess: importing any of these then raises ImportError.
BLOCK = "import sys\nfor _name in ('ray', 'mlflow', 'dvc'):\n    sys.modules[_name] = None\n"


def test_the_study_imports_without_ray_mlflow_or_dvc() -> None:
    code = BLOCK + (
        "import pipeline.models, pipeline.dvt, pipeline.train.loop, pipeline.train.task\n"
        "from pipeline.data import ShardStream, build_transforms, decode_sample, read_samples\n"
        "import benchmarks.gpu_suite, benchmarks.gpu_parts, benchmarks.reference_attention\n"
        "import timm\n"
        "assert 'dvt_t2t_vit_12' in timm.list_models('dvt*')\n"
        "print(sorted(n for n in ('ray', 'mlflow', 'dvc') if sys.modules.get(n) is not None))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_import_check_does_catch_a_blocked_import() -> None:
    # The same harness fails on a module that does import one of them at module level.
    code = BLOCK + "import ray\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "import of ray halted" in proc.stderr


def test_smoke_suite_writes_both_files_with_every_part(tmp_path: Path) -> None:
    # The whole suite, as CI runs it, with Ray, MLflow and DVC blocked (the GPU image has none of them).
    code = BLOCK + (
        "import runpy\n"
        f"sys.argv = ['gpu_suite', '--smoke', '--out', {str(tmp_path)!r}]\n"
        "runpy.run_module('benchmarks.gpu_suite', run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    table = (tmp_path / "gpu_suite.md").read_text()
    assert report["smoke"] is True and list(report["parts"]) == ["a", "b", "c", "d", "e"]
    for part, record in report["parts"].items():
        assert record["status"] == "ok", (part, record.get("error"))
        assert record["rows"], part
        for row in record["rows"]:
            assert f"| {part} | {row['table']['model']} | {row['table']['setting']} |" in table
    assert "| Part | Model | Setting | Result | Goal / reference | Verdict |" in table
    assert "not performance figures" in table and table in proc.stdout  # printed, too
    rates = [r for r in report["parts"]["a"]["rows"] if "images_per_s" in r]
    assert len(rates) == 6 and all(r["images_per_s"] > 0 and r["mfu"] > 0 for r in rates)  # compile: skipped
    assert all(report["parts"]["b"]["checks"].values())  # fused and plain formulations agree
    exits = next(r for r in report["parts"]["c"]["rows"] if "exit_fractions" in r)
    assert sum(exits["exit_fractions"]) == pytest.approx(1.0) and len(exits["stage_macs"]) == 3
    checks = report["parts"]["e"]["checks"]
    assert checks["step 6 loss equal after resume"] and checks["no NaN/inf (losses, weights)"]
    assert "loss falls" in checks


def test_a_part_past_its_limit_is_killed_with_its_children_and_keeps_its_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import gpu_suite

    def slow(ctx, rec) -> None:
        child = subprocess.Popen(["sleep", "60"])
        rec.row("m", "s", "r", pid=child.pid)
        time.sleep(60)

    monkeypatch.setitem(gpu_suite.STEPS, "slow", slow)
    ctx = gpu_suite.Context(gpu_suite.SMOKE_SIZES, True, "cpu", tmp_path, {})
    tic = time.perf_counter()
    record = gpu_suite.run_step("slow", ctx, 5.0)
    assert time.perf_counter() - tic < 30
    assert record["status"] == "timed out after 5 s"
    assert record["rows"][0]["table"]["result"] == "r"
    status = Path(f"/proc/{record['rows'][0]['pid']}/status")
    deadline = time.time() + 10
    while status.exists() and "zombie" not in status.read_text() and time.time() < deadline:
        time.sleep(0.1)
    assert not status.exists() or "zombie" in status.read_text()  # the part's own child died with it


def test_a_failing_part_is_recorded_and_the_table_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import gpu_suite

    def broken(ctx, rec) -> None:
        rec.row("m", "s", "half done")
        raise ValueError("the reason")

    monkeypatch.setitem(gpu_suite.STEPS, "broken", broken)
    ctx = gpu_suite.Context(gpu_suite.SMOKE_SIZES, True, "cpu", tmp_path, {})
    record = gpu_suite.run_step("broken", ctx, 60.0)
    assert record["status"] == "error" and "ValueError: the reason" in record["error"]
    report = {
        "smoke": True,
        "environment": {
            "date": "d",
            "machine": "x86_64",
            "cpus": 2,
            "torch": "t",
            "timm": "t",
            "python": "p",
        },
        "parts": {"c": record},
    }
    table = gpu_suite.markdown(report)
    assert "| c | m | s | half done |" in table
    assert "| c | DVT early exit | | **error: ValueError: the reason** | | incomplete |" in table


def test_a_failing_setting_is_a_row_and_the_part_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import gpu_parts, gpu_suite

    monkeypatch.setattr(gpu_parts, "SPEED_MODELS", ("no_such_model", "deit_small_paper"))
    rec = gpu_suite.Recorder(tmp_path / "b.json")
    gpu_parts.part_b(gpu_suite.Context(gpu_suite.SMOKE_SIZES, True, "cpu", tmp_path, {}), rec)
    failed, done = rec.rows
    assert failed["table"]["result"].startswith("failed: RuntimeError: Unknown model")
    assert failed["table"]["verdict"] == "error" and rec.errors == 1
    assert done["table"]["model"] == "deit_small_paper" and done["speedup"] > 0


def _tiny(name: str, img: int) -> torch.nn.Module:
    import timm

    import pipeline.models  # noqa: F401

    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, img_size=img, depth=1, embed_dim=32, num_heads=2).eval()


@pytest.mark.parametrize(
    ("name", "img", "switched"),
    [("t2t_vit_7", 32, 3), ("t2t_vit_t_14", 32, 3), ("deit_small_paper", 32, 1), ("dvt_t2t_vit_12", 64, 9)],
)
def test_plain_attention_computes_the_same_outputs_and_restores_the_model(
    name: str, img: int, switched: int
) -> None:
    from timm.layers import Attention

    from benchmarks.reference_attention import _performer_plain, _token_attention_plain, plain_attention
    from pipeline.models.t2t_vit import PerformerTokenAttention, TokenAttention

    model = _tiny(name, img)
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        fused = model(x)
        with plain_attention(model) as count:
            plain = model(x)
            for m in model.modules():
                if isinstance(m, Attention):
                    assert m.fused_attn is False
                if isinstance(m, PerformerTokenAttention):
                    assert m.forward.__func__ is _performer_plain
                if isinstance(m, TokenAttention):
                    assert m.forward.__func__ is _token_attention_plain
        again = model(x)
    fused, plain, again = (torch.cat(t) if isinstance(t, list) else t for t in (fused, plain, again))
    assert count == switched
    torch.testing.assert_close(plain, fused, rtol=1e-4, atol=1e-5)
    assert torch.equal(again, fused)
    assert all("forward" not in vars(m) for m in model.modules())


def test_the_plain_performer_is_the_same_function_with_gradients() -> None:
    from benchmarks.reference_attention import _performer_plain
    from pipeline.models.t2t_vit import PerformerTokenAttention

    torch.manual_seed(0)
    layer = PerformerTokenAttention(27, 16, num_features=8, proj_drop=0.0)
    x = torch.randn(3, 50, 27, requires_grad=True)
    fused = layer(x)
    (grad_fused,) = torch.autograd.grad(fused.square().sum(), x)
    plain = _performer_plain(layer, x)
    (grad_plain,) = torch.autograd.grad(plain.square().sum(), x)
    torch.testing.assert_close(plain, fused, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_plain, grad_fused, rtol=1e-4, atol=1e-6)
