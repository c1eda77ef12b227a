"""Every stage entry point answers --help, and a bad params file fails with the key named."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

#: Every stage entry point: the modules of stages/ (``_cli`` and ``__init__`` are not stages).
STAGES = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if not p.stem.startswith("_"))


def _takes_variant(stage: str) -> bool:
    return '"--variant"' in (ROOT / "stages" / f"{stage}.py").read_text()


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("stage", STAGES)
def test_help(root: Path, stage: str) -> None:
    proc = _run([f"stages.{stage}", "--help"], root)
    assert proc.returncode == 0 and "usage" in proc.stdout and "--params" in proc.stdout
    # One default per option: none says "(default: from params) (default: None)".
    help_text = " ".join(proc.stdout.split())
    assert "(default: None)" not in help_text and "(default: params.yaml)" in help_text
    assert not re.search(r"\(default: [^)]*\) \(default:", help_text), proc.stdout


@pytest.mark.parametrize("stage", STAGES)
def test_bad_key_fails_naming_it(root: Path, tmp_path: Path, stage: str) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["report"]["outptu"] = "x"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    args = [f"stages.{stage}", "--params", str(tmp_path / "params.yaml")]
    if _takes_variant(stage):  # a required argument; any variant will do, the params fail first
        args += ["--variant", next(iter(raw["variants"]))]
    proc = _run(args, root)
    assert proc.returncode != 0
    assert "report.outptu" in proc.stderr


def test_every_dvc_stage_runs_a_stage_module(root: Path) -> None:
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    modules = set()
    for stage in stages.values():
        cmd = stage.get("do", stage)["cmd"]  # a foreach stage keeps its command under "do"
        for line in [cmd] if isinstance(cmd, str) else cmd:
            modules.update(
                word.removeprefix("stages.") for word in line.split() if word.startswith("stages.")
            )
    assert modules and modules <= set(STAGES)


def test_unknown_variant_is_named(root: Path) -> None:
    proc = _run(["stages.train", "--variant", "no_such_variant"], root)
    assert proc.returncode != 0 and "no_such_variant" in proc.stderr
