"""The whole DAG, for real: `dvc repro` of the miniature profile in a fresh copy of the repo.

Real DVC, real Ray (2 workers, gloo), real MLflow (SQLite) and real tar shards; nothing mocked.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import copy_worktree, parse_page

# The whole miniature study (four trainings, an evaluation, two tunings, the report, an experiment):
# minutes on 2 cores, more under load; the suite's 900 s default is too tight for it.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def _sh(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 2000) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def _copy_repo(root: Path, dest: Path, params: str) -> Path:
    """The tracked and untracked-but-not-ignored files, as a fresh clone would have them."""
    copy_worktree(root, dest)
    shutil.copy2(root / params, dest / "params.yaml")
    (dest / "dvc.lock").unlink(missing_ok=True)
    _sh(["git", "init", "-q"], dest)
    _sh(["git", "add", "-A"], dest)
    _sh(["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "copy"], dest)
    return dest


def _ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def test_dvc_repro_runs_the_whole_study(root: Path, tmp_path: Path) -> None:
    repo = _copy_repo(root, tmp_path / "repo", "profiles/mini.yaml")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    variants = list(params["variants"])
    evaluations = list(params.get("pretrained") or {})  # evaluate@<name> stages
    assert evaluations

    cascades = params["dvt"]["variants"]
    assert len(cascades) == 2  # the foreach runs more than once

    first = _sh(["dvc", "repro"], repo)
    tuned = {f"tune_dvt@{c}" for c in cascades}
    evaluated = {f"evaluate@{e}" for e in evaluations}
    expected = {"demo", "shard", "report", *evaluated, *tuned, *(f"train@{v}" for v in variants)}
    assert _ran(first.stdout) == expected

    with open(repo / "reports" / "comparison.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["variant"] for r in rows] == variants
    chance = 100 / params["data"]["demo"]["num_classes"]
    for r in rows:
        assert float(r["top1"]) > chance, f"{r['variant']} top-1 {r['top1']} is not above chance {chance}"
        assert float(r["params_m"]) > 0 and float(r["macs_g"]) > 0 and float(r["images_per_s"]) > 0
    md = (repo / "reports" / "comparison.md").read_text()
    assert all(f"| {v} |" in md for v in variants)
    assert (repo / "reports" / "accuracy_vs_macs.png").stat().st_size > 1000

    # The HTML report: one self-contained page, one comparison row per variant, each linking to its run.
    page = parse_page(repo / "reports" / "index.html")
    rows = [a for t, a in page.rows if t == "comparison" and "data-variant" in a]
    assert [a["data-variant"] for a in rows] == variants
    assert all("/#/experiments/" in a.get("_links", "") for a in rows)
    assert page.images and all(src.startswith("data:image/") for src in page.images)
    # ... and DVC shows its metrics and plots.
    metrics = json.loads(_sh(["dvc", "metrics", "show", "--json"], repo).stdout)
    assert set(variants) <= set(json.dumps(metrics).split('"')), metrics
    plots = _sh(["dvc", "plots", "show", "--json"], repo).stdout
    assert "reports/comparison.csv" in plots and "reports/accuracy_vs_macs.png" in plots
    assert all(f"reports/curves/{v}.csv" in plots for v in variants)
    assert "reports/metrics.json" in _sh(["dvc", "exp", "show", "--json"], repo).stdout

    # MLflow holds one finished run per variant, with per-epoch metrics and the checkpoint.
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(store, registry_uri=store)
    for v in variants:
        record = json.loads((repo / "results" / f"{v}.json").read_text())
        run = client.get_run(record["run_id"])
        assert run.info.status == "FINISHED"
        # ... and its model in MLflow's format, registered; the only version, so the variant's @best.
        assert client.get_model_version_by_alias(v, "best").run_id == record["run_id"]
        assert run.data.tags["variant"] == v and run.data.tags["git_commit"] != "unknown"
        history = client.get_metric_history(record["run_id"], "val_top1")
        assert len(history) == params["train"]["epochs"]
        # The last epoch's weights and the best validation epoch's (docs/models.md, best or last).
        assert sorted(a.path for a in client.list_artifacts(record["run_id"], "checkpoint")) == [
            "checkpoint/best.pt",
            "checkpoint/model.pt",
        ]

    # The DVT study, per cascade: both threshold searches chosen within the budget on the calibration
    # images, measured throughput, and the reuse ablation where asked, all as MLflow child runs.
    from pipeline.dvt.records import TuneRecord

    experiment = client.get_experiment_by_name(params["tracking"]["experiment"]).experiment_id
    for cascade in cascades:
        record = TuneRecord.read(repo / "results" / "dvt" / cascade / "best.yaml")
        budget = params["dvt"]["budget_gmacs"][cascade]
        assert record.msdnet.calib_avg_gmacs <= budget + 1e-9
        assert (record.calibration, record.calibration_images) == ("val", params["dvt"]["calibration_images"])
        val_images = params["data"]["demo"]["val_per_class"] * params["data"]["demo"]["num_classes"]
        assert record.calibration_images + record.reported_images == val_images
        speeds = {(r.model, r.point): r.images_per_s for r in record.throughput.rows}
        assert speeds[("early_exit", "budget")] > 0 and speeds[("simulate_all", "budget")] > 0
        ablation = cascade in params["dvt"]["reuse_ablation"]
        assert (record.reuse is not None) == ablation and (record.static is not None) == (
            cascade in params["dvt"]["backbones"]
        )
        children = client.search_runs(
            [experiment], filter_string=f"tags.mlflow.parentRunId = '{record.run_id}'"
        )
        assert len(children) == 4 * ablation + params["dvt"]["threshold_trials"]
        assert client.get_run(record.run_id).data.metrics["images_per_s_early_exit_budget"] > 0
    assert "dvt_speed" in (repo / "reports" / "index.html").read_text()

    # The demo training written in the T2T-ViT authors' release format and evaluated as an outside
    # checkpoint (timm's pretrained path, the evaluate stage): the top-1 of the run that made it.
    from pipeline.tracking import file_sha256

    for name in evaluations:
        trained = json.loads((repo / params["pretrained"][name]["checkpoint"]).read_text())
        result = json.loads((repo / "results" / "pretrained" / f"{name}.json").read_text())
        first_seed = next(r for r in trained["runs"] if r["run_id"] == trained["run_id"])
        assert result["top1"] == first_seed[trained["summary"]["top1"]["metric"]], (result, first_seed)
        assert result["source_run_id"] == trained["run_id"] and result["images"] > 0
        exported = repo / "runs" / "exports" / f"{name}.pth.tar"
        tags = client.get_run(result["run_id"]).data.tags
        assert tags["checkpoint_sha256"] == file_sha256(exported) == result["checkpoint_sha256"]

    # results/ holds only what dvc.lock lists as outputs: the report depends on the whole folder, and
    # a cluster job's saved state (pipeline.state) carries outputs only, so any other file would
    # make a fetched study look changed.
    from pipeline.state import state_paths

    listed = set(state_paths((repo / "dvc.lock").read_text()))
    stray = [str(f.relative_to(repo)) for f in (repo / "results").rglob("*") if f.is_file()]
    assert not [f for f in stray if f not in listed], stray

    # Nothing changed: nothing runs.
    second = _sh(["dvc", "repro"], repo)
    assert _ran(second.stdout) == set(), second.stdout

    # DVC experiments: this run committed as the baseline, then an experiment on a key params.yaml
    # does not have yet (hence "+"); dvc exp show lists both with their metrics, and metrics diff works.
    _sh(["git", "add", "dvc.lock"], repo)
    _sh(["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "baseline"], repo)
    # In the workspace: only the report re-runs. (A --temp/--queue copy also re-runs the shard stage
    # and each tune_dvt, whose outputs DVC does not restore there: minutes more in CI; tests/test_paths.py
    # checks that such a copy keeps MLflow and Ray state in the checkout.)
    exp = _sh(["dvc", "exp", "run", "-S", "+report.epoch=best"], repo)
    assert _ran(exp.stdout) == {"report"}, exp.stdout
    shown = json.loads(_sh(["dvc", "exp", "show", "--json"], repo).stdout)
    baseline = next(r for r in shown if r["rev"] != "workspace")
    [experiment] = [e["revs"][0] for e in baseline["experiments"]]
    assert experiment["data"]["params"]["params.yaml"]["data"]["report"]["epoch"] == "best"
    for row in (baseline["data"], experiment["data"]):
        assert set(variants) <= set(json.dumps(row["metrics"]["reports/metrics.json"]["data"]).split('"'))
        assert all(row["metrics"][f"results/{v}.json"]["data"]["val_top1"] > 0 for v in variants)
    diff = _sh(["dvc", "metrics", "diff", "--all", "--json", "HEAD", experiment["rev"]], repo)
    diff = json.loads(diff.stdout)
    assert {f"results/{v}.json" for v in variants} | {"reports/metrics.json"} <= set(diff), diff

    # One variant's params change: only its training and the report run again.
    dvt_inputs = {*cascades, *params["dvt"]["backbones"].values()}
    changed = [v for v in variants if v not in dvt_inputs][-1]
    params["variants"][changed].setdefault("train", {})["epochs"] = params["train"]["epochs"] + 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _sh(["dvc", "repro"], repo)
    assert _ran(third.stdout) == {f"train@{changed}", "report"}, third.stdout


def _bad_repro(root: Path, tmp_path: Path, edit) -> tuple[subprocess.CompletedProcess, float, Path]:
    repo = _copy_repo(root, tmp_path / "repo", "profiles/mini.yaml")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    edit(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    tic = time.monotonic()
    proc = _sh(["dvc", "repro"], repo, check=False, timeout=120)
    return proc, time.monotonic() - tic, repo


def test_misspelt_key_fails_fast_and_leaves_nothing(root: Path, tmp_path: Path) -> None:
    def edit(p: dict) -> None:
        p["data"]["demo"]["num_clases"] = p["data"]["demo"].pop("num_classes")

    proc, seconds, repo = _bad_repro(root, tmp_path, edit)
    assert proc.returncode != 0
    assert "data.demo.num_clases" in proc.stdout + proc.stderr
    assert seconds < 10, f"took {seconds:.1f} s"
    assert not (repo / "data" / "demo").exists() and not (repo / "data" / "shards").exists()


def test_missing_data_source_fails_fast_and_leaves_nothing(root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-imagenet"

    def edit(p: dict) -> None:
        p["data"].update(source="folder", root=str(missing))

    proc, seconds, repo = _bad_repro(root, tmp_path, edit)
    assert proc.returncode != 0
    assert str(missing) in proc.stdout + proc.stderr
    assert seconds < 10, f"took {seconds:.1f} s"
    assert not (repo / "data" / "shards").exists()
