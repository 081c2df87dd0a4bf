"""What a run is tagged with: where its code, data and params came from, and which tags are its own."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from catdog.core import lifecycle
from catdog.core.params import Params
from catdog.core.paths import Paths
from catdog.data import integrity

CHECKPOINT_TAG = "catdog.checkpoint_md5"
CLASSES_PARAM = "catdog.classes"  # JSON list of the class names, as the model outputs them
FAILED_STAGE_TAG = "catdog.failed_stage"
REUSED_TAG = "catdog.reused_from"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests the run under its parent
# Set by `catdog tune` for each trial's `dvc exp run`: the study's parent run (catdog.tracking.study).
PARENT_RUN_ENV = "CATDOG_PARENT_RUN_ID"
RESULTS_TAG = "catdog.results."  # + stage name: "logged" or "copied"
RUN_OWN_TAGS = {
    "mlflow.runName",
    "mlflow.log-model.history",
    "mlflow.user",  # not copied to a derived run
    lifecycle.HOST_TAG,
    lifecycle.PID_TAG,
    lifecycle.STARTED_TAG,
    "catdog.stage",
    "catdog.stopped",
    FAILED_STAGE_TAG,
    PARENT_TAG,  # a derived run takes this process's parent (dvc_exp_tags), never its source's
}
# Set by DVC for every stage of `dvc exp run`, in the workspace and in queued runs (.dvc/tmp/exps);
# not by a plain `dvc repro`.
DVC_EXP_TAGS = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev"}
_LINEAGE_FILES = ("src", "stages", "dvc.yaml", "params.yaml", "pyproject.toml")


def lineage_tags(params: Params, paths: Paths) -> dict[str, str]:
    """Git commit, data hash (of data/prepared's recorded content: catdog.data.integrity), DVC experiment."""
    tags = {"catdog.params_hash": params_hash(params)}
    commit = _git(paths.root, "rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        # Only code and params count: dvc repro itself rewrites dvc.lock and metrics before train runs.
        tags["git.dirty"] = str(bool(_git(paths.root, "status", "--porcelain", "--", *_LINEAGE_FILES)))
    if paths.prepared_content.is_file():
        tags["data.hash"] = integrity.data_hash(paths)
    tags.update(dvc_exp_tags())
    return tags


def dvc_exp_tags() -> dict[str, str]:
    """The DVC experiment this process runs in and, for a trial of ``catdog tune``, its study's parent run."""
    tags = {tag: os.environ[env] for env, tag in DVC_EXP_TAGS.items() if os.environ.get(env)}
    if os.environ.get(PARENT_RUN_ENV):
        tags[PARENT_TAG] = os.environ[PARENT_RUN_ENV]
    return tags


def copied_tag(key: str) -> bool:
    """Whether a run's tag ``key`` may pass to a run derived from it (its own tags and results do not)."""
    return key not in RUN_OWN_TAGS and key not in DVC_EXP_TAGS.values()


def run_name(params: Params) -> str:
    """The DVC experiment name when there is one, else arch/mode and a short params hash."""
    return os.environ.get("DVC_EXP_NAME") or (f"{params.train.arch}-{params.train.mode}-{params_hash(params)[:6]}")


def params_hash(params: Params) -> str:
    return hashlib.md5(json.dumps(params.flat(), sort_keys=True, default=str).encode()).hexdigest()


def param_value(value: object) -> str:
    return "null" if value is None else str(value)


def _git(cwd: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
