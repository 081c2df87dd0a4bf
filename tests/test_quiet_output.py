"""What a person reads at ``dvc repro``: each stage's own progress and one summary line. MLflow's
INFO lines (store creation, the system-metrics monitor), its artifact download bars, its registry
prints and the CloudPickle warning stay silent unless CATDOG_DEBUG=1; warnings still show."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from catdog.pipeline.stage import summary_line

from dvc_project import STAGES, TINY_PARAMS, copy_project

SRC = Path(__file__).resolve().parents[1] / "src"
MLFLOW_NOISE = re.compile(
    r" INFO mlflow|alembic|Downloading artifacts|CloudPickle|system metrics|Successfully registered|Created version"
)

# A fresh store, a run with the system-metrics monitor, an MLflow warning: as a stage does it.
TRACKED = """
import logging, sys
from pathlib import Path
import mlflow
from catdog.tracking import store
store.connect(Path(sys.argv[1]))
with mlflow.start_run(log_system_metrics=True):
    mlflow.log_metric("x", 1.0)
logging.getLogger("mlflow.tracking").warning("an MLflow warning still shows")
"""


def tracked_stderr(root: Path, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CATDOG_"))}
    proc = subprocess.run(
        [sys.executable, "-c", TRACKED, str(root)],
        cwd=root,
        env={**base, "PYTHONPATH": str(SRC), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_mlflow_info_lines_are_silent_and_its_warnings_show(tmp_path):
    stderr = tracked_stderr(tmp_path)
    assert not MLFLOW_NOISE.search(stderr) and " INFO " not in stderr, stderr
    assert "an MLflow warning still shows" in stderr
    assert (tmp_path / "mlflow.db").is_file()  # the store was created (MLflow's INFO line is the silent one)


def test_catdog_debug_lets_mlflow_speak(tmp_path):
    stderr = tracked_stderr(tmp_path, CATDOG_DEBUG="1")
    assert "INFO mlflow.store.db.utils: Creating initial MLflow database tables" in stderr, stderr
    assert "INFO mlflow.system_metrics" in stderr, stderr


def test_summary_line_shows_the_headline_figures():
    results = {
        "accuracy": 0.990385,
        "precision": 0.98,
        "precision_cat": 1.0,  # a breakdown of precision: in the reports
        "log_loss": 0.04215,
        "onnx_max_abs_diff": 1.2e-06,
        "n": 104,
        "promoted_champion": True,
        "per_class": {"cat": {"f1": 1.0}},  # nested: in the reports
    }
    line = summary_line("evaluate", results)
    assert line == (
        "evaluate: accuracy 0.9904, precision 0.98, log_loss 0.04215, onnx_max_abs_diff 1.2e-06, n 104, "
        "promoted_champion True (+2 more: CATDOG_DEBUG=1 prints all)"
    )
    assert summary_line("train", {"val_accuracy": 0.5, "best_epoch": 2}) == "train: val_accuracy 0.5, best_epoch 2"


def test_summary_notes_follow_on_their_own_lines():
    results = {"accuracy": 0.75, "notes": ["confused a -> b: 3 (60% of a)", "confused b -> a: 1 (10% of b)"]}
    assert summary_line("evaluate", results).splitlines() == [
        "evaluate: accuracy 0.75",
        "evaluate: confused a -> b: 3 (60% of a)",
        "evaluate: confused b -> a: 1 (10% of b)",
    ]


def test_summary_line_keeps_to_ten_figures():
    line = summary_line("export", {f"figure{i}": i for i in range(12)})
    assert line.count(",") == 9 and line.endswith("figure9 9 (+2 more: CATDOG_DEBUG=1 prints all)")


SUMMARY = r"[\w.]+ \S+(, [\w.]+ \S+)*( \(\+\d+ more: CATDOG_DEBUG=1 prints all\))?"


@pytest.mark.slow
def test_dvc_repro_prints_one_summary_line_per_stage_and_no_mlflow_info(tmp_path):
    project = copy_project(tmp_path / "project", TINY_PARAMS)
    del project.env["TQDM_DISABLE"]  # progress bars as a person sees them: MLflow's must stay away
    proc = project.dvc("repro")
    lines = (proc.stdout + proc.stderr).splitlines()
    noise = [line for line in lines if MLFLOW_NOISE.search(line)]
    assert not noise, "\n".join(noise)
    for stage in STAGES:
        summaries = [line for line in lines if re.fullmatch(rf"{stage}: {SUMMARY}", line)]
        assert len(summaries) == 1, (stage, summaries, proc.stdout)
    assert any(re.match(r"evaluate: accuracy \d", line) for line in lines), proc.stdout
    assert (project.root / "models" / "export" / "model.onnx").is_file()
