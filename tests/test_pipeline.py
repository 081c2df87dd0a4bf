"""End to end: the real ``dvc repro`` on a tiny synthetic dataset, in a throwaway git repository.

One module-scoped fixture per pipeline state, each building on the previous one:

  project        copy of the repository (git-tracked + untracked-not-ignored files), a tiny
                 Kaggle-layout zip, tiny params, ``git init`` + commit, first ``dvc repro``
  noop_repro     ``dvc repro`` again with nothing changed
  lr_repro       ``train.lr`` changed: train, evaluate, export rerun, a new MLflow run
  eval_repro     only ``evaluate.batch_size`` changed: evaluate reruns (export only if the test
                 metrics moved) in a new run that copies the previous one's train and export
                 results (MLflow params are immutable)
  train_repro    ``dvc repro -f -s train``: the same checkpoint again, in a new run that copies
                 the evaluate and export results DVC does not recompute

Tests that look at the state after the first repro come first in the file; pytest runs them in
file order, and a test that needs a later state asks for its fixture, so ``-k`` selections
still work. Every fixture snapshots what later states overwrite (run ids, stdout).
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dvc_project import COLOURS, PER_CLASS, REPO, STAGES, Project, cached_outputs, copy_project, stage_runs
from dvc_project import TINY_PARAMS as SHARED_TINY_PARAMS
from dvc_project import describe as _describe
from dvc_project import tool as _tool

pytestmark = pytest.mark.slow

# The project-building helpers are shared with the other real-dvc tests (tests/dvc_project.py).
EXPERIMENT = "catdog"
EPOCHS = 3
FIRST_LR, SECOND_LR = 0.001, 0.003
FIRST_EVAL_BATCH, SECOND_EVAL_BATCH = 16, 8
TINY_PARAMS = {  # the shared tiny project's params, with this module's epochs, lr and eval batch
    "data": {**SHARED_TINY_PARAMS["data"], "workers": 2},
    "train": {**SHARED_TINY_PARAMS["train"], "epochs": EPOCHS, "lr": FIRST_LR},
    "evaluate": {"batch_size": FIRST_EVAL_BATCH},
    "export": SHARED_TINY_PARAMS["export"],  # fp32 only: predict then runs what evaluate measured
}


@dataclass(frozen=True)
class ReproResult:
    stdout: str
    run_ids: tuple[str, ...]  # every MLflow run id after this repro, oldest first
    run: str  # the pipeline's run: the most recent one tagged with the checkpoint's md5


def _snapshot(project: Project, stdout: str) -> ReproResult:
    md5 = hashlib.md5((project.root / "models" / "checkpoint.pt").read_bytes()).hexdigest()
    tagged = project.client().search_runs(
        [project.experiment_id()], f"tags.`catdog.checkpoint_md5` = '{md5}'", order_by=["attributes.start_time DESC"]
    )
    assert tagged, f"no MLflow run tagged with the checkpoint's md5 {md5}"
    return ReproResult(stdout, tuple(r.info.run_id for r in project.runs()), tagged[0].info.run_id)


def assert_full_results(run, train_lr: float, eval_batch: int) -> None:
    """What every run a pipeline invocation creates holds: all params and every stage's results."""
    params, tags = run.data.params, run.data.tags
    assert params["train.lr"] == str(train_lr) and params["evaluate.batch_size"] == str(eval_batch), params
    assert "export.tolerance" in params and "data.source" in params and "tracking.experiment_name" in params
    assert {tags.get(f"catdog.results.{stage}") for stage in ("train", "evaluate", "export")} <= {"logged", "copied"}
    assert "test/accuracy" in run.data.metrics and "export/onnx_max_abs_diff" in run.data.metrics
    assert "val/accuracy" in run.data.metrics


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    """A temp copy of the repository with tiny data and params, after one ``dvc repro``."""
    root = tmp_path_factory.mktemp("pipeline") / "project"
    proj = copy_project(root, TINY_PARAMS)

    assert not (root / "mlflow.db").exists()
    proj.first = _snapshot(proj, proj.repro())
    return proj


@pytest.fixture(scope="module")
def noop_repro(project: Project) -> tuple[ReproResult, ReproResult]:
    """(before, after) a second ``dvc repro`` with nothing changed."""
    before = _snapshot(project, project.repros[-1])
    return before, _snapshot(project, project.repro())


@pytest.fixture(scope="module")
def lr_repro(project: Project, noop_repro) -> tuple[ReproResult, ReproResult]:
    before = _snapshot(project, project.repros[-1])
    project.set_params({"train": {"lr": SECOND_LR}})
    return before, _snapshot(project, project.repro())


@pytest.fixture(scope="module")
def eval_repro(project: Project, lr_repro) -> tuple[ReproResult, ReproResult]:
    before = _snapshot(project, project.repros[-1])
    project.set_params({"evaluate": {"batch_size": SECOND_EVAL_BATCH}})
    return before, _snapshot(project, project.repro())


@pytest.fixture(scope="module")
def train_repro(project: Project, eval_repro) -> tuple[ReproResult, ReproResult, str]:
    """(before, after, checkpoint md5 before) ``dvc repro -f -s train``."""
    before = _snapshot(project, project.repros[-1])
    md5 = hashlib.md5((project.root / "models" / "checkpoint.pt").read_bytes()).hexdigest()
    stdout = project.dvc("repro", "-f", "-s", "train").stdout
    return before, _snapshot(project, stdout), md5


# --------------------------------------------------------------------------- first repro


def test_first_repro_runs_every_stage_and_locks_them(project: Project):
    assert stage_runs(project.first.stdout) == set(STAGES), project.first.stdout
    lock = yaml.safe_load((project.root / "dvc.lock").read_text())
    assert set(STAGES) <= set(lock["stages"]), f"dvc.lock stages: {sorted(lock['stages'])}"
    prepare_lock = lock["stages"]["prepare"]
    assert prepare_lock["params"]["params.yaml"]["data"]["source"] == "data/tiny.zip"
    assert "data/tiny.zip" in {dep["path"] for dep in prepare_lock["deps"]}
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["lr"] == FIRST_LR


def test_stage_metrics_files(project: Project):
    summary = project.json("data/prepared/summary.json")
    assert summary["images"] == 2 * PER_CLASS, summary
    assert summary["cache_size"] == 64
    assert summary["rejected_total"] == 1 and summary["rejected"] == {"not_an_image": 1}, summary
    assert sum(n for split in summary["splits"].values() for n in split.values()) == 2 * PER_CLASS
    for split in ("train", "val", "test"):
        assert all(summary["splits"][split][label] >= 1 for label in COLOURS), summary["splits"]

    images = project.json("reports/prepare/metrics.json")
    assert images == {f"{split}_images": sum(summary["splits"][split].values()) for split in summary["splits"]}

    train = project.json("reports/train/metrics.json")
    assert set(train) == {"best_epoch", "val_accuracy", "val_loss"}, train
    assert 1 <= train["best_epoch"] <= EPOCHS, train
    assert 0.0 <= train["val_accuracy"] <= 1.0
    history = list(csv.DictReader((project.root / "reports/train/history.csv").open()))
    assert [int(row["epoch"]) for row in history] == list(range(1, EPOCHS + 1))

    evaluate = project.json("reports/evaluate/metrics.json")
    assert set(evaluate) == {"accuracy", "log_loss", "roc_auc", "f1", "ece"}, evaluate
    assert 0.0 <= evaluate["accuracy"] <= 1.0, evaluate
    details = project.json("reports/evaluate/details.json")
    assert details["n"] == sum(summary["splits"]["test"].values())
    assert details["accuracy"] == evaluate["accuracy"] and len(details) > len(evaluate), details

    audit = project.json("reports/audit/metrics.json")  # every prepared image, audited before train
    assert audit["audited_images"] == summary["images"] and audit["folds"] == 5, audit
    assert set(audit) == {
        "audited_images",
        "flagged",
        "near_duplicate_groups",
        "near_duplicate_images",
        "outliers",
        "folds",
    }
    issues = list(csv.DictReader((project.root / "reports/audit/label_issues.csv").open()))
    assert len(issues) == audit["flagged"] and all(row["given"] != row["suggested"] for row in issues), issues

    export = project.json("models/export/parity.json")
    tolerance = project.params()["export"]["tolerance"]
    assert export["onnx_max_abs_diff"] <= tolerance and export["pt2_max_abs_diff"] <= tolerance, export
    assert export["onnx_accuracy"] == export["pt2_accuracy"] == export["eager_accuracy"], export

    for png in ("reports/audit/label_issues.png", "reports/train/curves.png", "reports/evaluate/confusion_matrix.png"):
        assert (project.root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"


def test_export_files(project: Project):
    exported = project.root / "models" / "export"
    assert (exported / "model.onnx").stat().st_size > 0
    assert json.loads((exported / "labels.json").read_text())["classes"] == ["cat", "dog"]
    preprocess = json.loads((exported / "preprocess.json").read_text())
    assert preprocess["cache_size"] == 64 and preprocess["image_size"] == 64, preprocess


def test_dvc_metrics_show(project: Project):
    proc = project.run(_tool("dvc"), "metrics", "show", "--json")
    try:
        shown = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"`dvc metrics show --json` printed no JSON:\n{_describe(proc)}")
    files = shown[""]["data"]  # "" = the workspace
    assert sorted(files) == [
        "reports/audit/metrics.json",
        "reports/evaluate/metrics.json",
        "reports/prepare/metrics.json",
        "reports/train/metrics.json",
    ], sorted(files)
    for name in files:
        assert "error" not in files[name], f"{name}: {files.get(name)}"
    assert sum(len(f["data"]) for f in files.values()) == 17, "the headline figures only"
    evaluate = project.json("reports/evaluate/metrics.json")
    assert files["reports/evaluate/metrics.json"]["data"]["accuracy"] == evaluate["accuracy"]


def test_the_correction_files_are_deps_of_prepare(project: Project):
    """An edited data/exclude.csv (params.yaml's data.exclude) makes prepare, and all after it, stale."""
    exclude = project.root / "data" / "exclude.csv"
    committed = exclude.read_text()
    try:
        exclude.write_text(committed + "train/cat.3.jpg\n")
        status = json.loads(project.dvc("status", "--json").stdout)
    finally:
        exclude.write_text(committed)
    assert {"changed deps": {"data/exclude.csv": "modified"}} in status["prepare"], status
    assert json.loads(project.dvc("status", "--json").stdout) == {}


def test_one_mlflow_run_in_the_project_store_with_params_metrics_and_lineage(project: Project):
    assert (project.root / "mlflow.db").is_file(), "the default store is <project>/mlflow.db"
    runs = project.runs()
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert (project.root / "mlruns").is_dir(), "artifacts belong beside mlflow.db"

    params = run.data.params
    assert params["train.lr"] == str(FIRST_LR)
    assert params["train.epochs"] == str(EPOCHS)
    assert params["data.source"] == "data/tiny.zip"
    assert params["evaluate.batch_size"] == str(FIRST_EVAL_BATCH)
    assert "export.tolerance" in params and "tracking.experiment_name" in params

    client = project.client()
    history = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
    assert "test/accuracy" in run.data.metrics
    assert run.data.metrics["test/accuracy"] == project.json("reports/evaluate/metrics.json")["accuracy"]
    assert "export/onnx_max_abs_diff" in run.data.metrics
    assert run.data.metrics["audit/flagged"] == project.json("reports/audit/metrics.json")["flagged"]

    tags = run.data.tags
    assert tags.get("mlflow.source.git.commit") == project.git("rev-parse", "HEAD")
    content = project.root / "data" / "prepared" / "content.json"  # md5 of images.npy and manifest.csv
    assert tags.get("data.hash") == hashlib.md5(content.read_bytes()).hexdigest()
    assert "catdog.reused_from" not in tags
    assert (
        tags["catdog.checkpoint_md5"] == hashlib.md5((project.root / "models/checkpoint.pt").read_bytes()).hexdigest()
    )


def test_mlflow_logged_model_and_artifacts(project: Project):
    run_id = project.first.run
    client = project.client()

    # MLflow 3: log_model(name=...) creates a LoggedModel, linked to the run as an output.
    models = {
        m.name: m
        for m in client.search_logged_models(experiment_ids=[project.experiment_id()])
        if m.source_run_id == run_id
    }
    # the registered pyfunc from export; no PyTorch model from train (tracking.log_pytorch_model: false)
    assert sorted(models) == ["classifier"], models
    model = models["classifier"]
    assert str(model.status).endswith("READY"), model.status
    outputs = client.get_run(run_id).outputs
    assert model.model_id in {o.model_id for o in outputs.model_outputs}, outputs

    artifacts = project.artifacts(run_id)
    expected = {
        "export/MODEL_CARD.md",
        "lineage/params.yaml",
        "lineage/dvc.lock",
        "lineage/dvc.yaml",
        "plots/curves.png",
        "plots/confusion_matrix.png",
        "audit/label_issues.csv",  # the audit ran before this run existed: evaluate logged its files
        "audit/label_issues.png",
        "audit/other_issues.csv",
    }
    assert expected <= artifacts, f"missing: {sorted(expected - artifacts)}; have {sorted(artifacts)}"
    assert not {"export/model.onnx", "export/model.pt2"} & artifacts  # the model files live in logged models

    logged_params = Path(client.download_artifacts(run_id, "lineage/params.yaml"))
    assert yaml.safe_load(logged_params.read_text()) == project.params()


def test_each_model_file_is_stored_once_and_no_json_is_large(project: Project):
    """Lean artifacts: no model file twice under mlruns/ (no plain copy beside the logged model)."""
    files = [f for f in (project.root / "mlruns").rglob("*") if f.is_file()]
    by_content: dict[str, list[str]] = {}
    for f in files:
        if f.stat().st_size >= 4096:
            by_content.setdefault(hashlib.md5(f.read_bytes()).hexdigest(), []).append(str(f.relative_to(project.root)))
    assert not [names for names in by_content.values() if len(names) > 1]
    assert [f.name for f in files].count("model.onnx") == 1
    assert not [f for f in files if f.suffix == ".json" and f.stat().st_size > 200_000]


def test_the_run_logs_its_data_as_a_dataset_with_dvcs_md5(project: Project, tmp_path: Path):
    from catdog.core.paths import Paths
    from catdog.tracking import prepared_digest

    lock = yaml.safe_load((project.root / "dvc.lock").read_text())
    (dvc_md5,) = [o["md5"] for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/prepared"]
    (logged,) = project.client().get_run(project.first.run).inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.digest) == ("tiny.zip", dvc_md5)
    summary = project.json("data/prepared/summary.json")["splits"]
    assert json.loads(logged.dataset.profile) == {
        "images": sum(sum(c.values()) for c in summary.values()),
        **{split: sum(c.values()) for split, c in summary.items()},
        "per_class": summary,
    }
    # without a dvc.lock, the same md5 computed the way DVC does
    copy = tmp_path / "copy"
    shutil.copytree(project.root / "data" / "prepared", copy / "data" / "prepared")
    assert prepared_digest(Paths.under(copy)) == dvc_md5


def test_every_stage_logs_into_the_same_run(project: Project):
    first = project.first
    assert first.run_ids == (first.run,)
    tags = project.client().get_run(first.run).data.tags
    assert {tags[f"catdog.results.{stage}"] for stage in ("train", "evaluate", "export")} == {"logged"}


def test_no_run_id_in_dvc_outputs(project: Project):
    """A run id differs on every run: in a DVC output it would make dvc.lock differ every time."""
    first = project.first
    outputs = [
        project.root / "models" / "checkpoint.pt",
        *(project.root / "models" / "export").rglob("*"),
        *(project.root / "reports").rglob("*"),
    ]  # not models/train_state.pt: no DVC output
    tracked = [p for p in outputs if p.is_file()]
    assert not [str(p) for p in tracked if first.run.encode() in p.read_bytes()]


def test_predict_cli_matches_evaluate(project: Project, tmp_path: Path):
    """`catdog predict` (ONNX Runtime) on the test images agrees with evaluate (PyTorch)."""
    expected = {row["path"]: row for row in csv.DictReader((project.root / "reports/evaluate/predictions.csv").open())}
    images = tmp_path / "images"
    images.mkdir()
    with zipfile.ZipFile(project.root / "data" / "tiny.zip") as archive:
        chosen = sorted(expected)[:1] + sorted(expected)[-1:]  # a cat and a dog
        files = []
        for member in chosen:
            files.append(images / Path(member).name)
            files[-1].write_bytes(archive.read(member))
    broken = images / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated, not really a jpeg")
    missing = images / "missing.jpg"

    proc = project.run(_tool("catdog"), "predict", *map(str, files), str(broken), str(missing))
    lines = proc.stdout.splitlines()
    assert len(lines) == 4, _describe(proc)
    results = [json.loads(line) for line in lines]  # one JSON object per line
    assert [r["path"] for r in results] == [str(f) for f in (*files, broken, missing)]
    for member, result in zip(chosen, results[:2]):
        assert "error" not in result, result
        assert result["label"] == expected[member]["predicted"], (result, expected[member])
        assert result["confidence"] == pytest.approx(float(expected[member]["confidence"]), abs=1e-3)
    assert set(results[2]) == {"path", "error"} and results[2]["error"], results[2]
    assert results[3] == {"path": str(missing), "error": "no such file"}


# --------------------------------------------------------------------------- reruns


def test_second_repro_without_changes_runs_nothing(project: Project, noop_repro):
    before, after = noop_repro
    assert stage_runs(after.stdout) == set(), after.stdout
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change" in after.stdout, after.stdout
    assert after.run_ids == before.run_ids, "a no-op repro must not create MLflow runs"
    assert after.run == before.run


def test_train_param_change_reruns_downstream_in_a_new_run(project: Project, lr_repro):
    before, after = lr_repro
    assert stage_runs(after.stdout) == {"train", "evaluate", "export"}, after.stdout
    assert "Stage 'prepare' didn't change" in after.stdout

    assert len(after.run_ids) == 2, after.run_ids
    new_run = (set(after.run_ids) - set(before.run_ids)).pop()
    assert after.run == new_run != before.run

    run = project.client().get_run(new_run)
    assert_full_results(run, SECOND_LR, FIRST_EVAL_BATCH)
    assert run.data.tags.get("mlflow.source.git.commit") == project.git("rev-parse", "HEAD")
    assert "catdog.reused_from" not in run.data.tags
    # The old run is untouched.
    assert project.client().get_run(before.run).data.params["train.lr"] == str(FIRST_LR)


def test_only_evaluate_reruns_in_a_run_with_every_stages_results(project: Project, eval_repro):
    before, after = eval_repro
    assert "evaluate" in stage_runs(after.stdout) <= {"evaluate", "export"}, after.stdout
    for stage in ("prepare", "train"):
        assert f"Stage '{stage}' didn't change" in after.stdout, after.stdout

    assert len(after.run_ids) == 3, after.run_ids
    derived = (set(after.run_ids) - set(before.run_ids)).pop()
    assert after.run == derived

    client = project.client()
    run = client.get_run(derived)
    assert_full_results(run, SECOND_LR, SECOND_EVAL_BATCH)
    assert run.data.tags.get("catdog.reused_from") == before.run
    assert run.data.tags["catdog.results.train"] == "copied" and run.data.tags["catdog.results.evaluate"] == "logged"
    assert run.data.tags.get("data.hash") == client.get_run(before.run).data.tags["data.hash"]
    history = client.get_metric_history(derived, "val/accuracy")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), "metric history copied"
    assert run.data.metrics["test/accuracy"] == project.json("reports/evaluate/metrics.json")["accuracy"]
    assert "plots/confusion_matrix.png" in project.artifacts(derived)
    # The source run keeps its own value: MLflow params are immutable.
    source = client.get_run(before.run)
    assert source.data.params["evaluate.batch_size"] == str(FIRST_EVAL_BATCH)


def test_forced_train_with_an_identical_checkpoint_gives_a_full_run(project: Project, train_repro):
    before, after, md5 = train_repro
    assert stage_runs(after.stdout) == {"train"}, after.stdout
    assert hashlib.md5((project.root / "models/checkpoint.pt").read_bytes()).hexdigest() == md5, (
        "train is deterministic on one machine: the same checkpoint again"
    )
    new = set(after.run_ids) - set(before.run_ids)
    assert new == {after.run}, (before.run_ids, after.run_ids)
    run = project.client().get_run(after.run)
    assert_full_results(run, SECOND_LR, SECOND_EVAL_BATCH)
    assert run.data.tags["catdog.reused_from"] == before.run
    assert run.data.tags["catdog.results.train"] == "logged"
    assert run.data.tags["catdog.results.evaluate"] == "copied"
    assert project.dvc("status").stdout.strip().endswith("up to date."), "nothing else to rerun"


def test_derived_run_keeps_git_commit_lineage(project: Project, eval_repro):
    _, after = eval_repro
    tags = project.client().get_run(after.run).data.tags
    assert tags.get("mlflow.source.git.commit") == project.git("rev-parse", "HEAD"), tags


# --------------------------------------------------------------------------- repository


def test_repository_does_not_git_track_dvc_cached_outputs():
    """Regression: the three mlflow_run.json outs (now gone) were once committed to git, and `dvc repro`
    then fails in a clean checkout ("output ... is already tracked by SCM")."""
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")
    tracked = (
        subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    )
    clashes = [
        out
        for out in cached_outputs(REPO / "dvc.yaml")
        if any(name == out or name.startswith(out.rstrip("/") + "/") for name in tracked)
    ]
    assert clashes == [], f"git-tracked DVC-cached outputs: {clashes}"
