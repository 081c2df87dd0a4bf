"""A teammate's fresh clone: ``git clone`` + ``dvc pull`` from the remote, and ``dvc repro`` has
nothing left to do.

The shared experiments project (tests/dvc_project.py) configured a local-directory remote
(``dvc remote add -d storage <dir>``, committed in .dvc/config), reproduced the tiny pipeline,
committed the result and ran ``dvc push``. An S3 remote works the same way (docs/operations.md).
"""

from __future__ import annotations

import pytest
import yaml

import dvc_project as dp
from dvc_project import STAGES, Project, stage_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[dp.Experiments, Project]:
    exps = dp.experiments(tmp_path_factory)
    root = tmp_path_factory.mktemp("clone") / "project"
    exps.project.git("clone", "-q", str(exps.project.root), str(root))
    return exps, Project(root, dp.clean_env(PYTHONPATH=str(root / "src")))


def lock_outs(project: Project, rev: str) -> dict[str, str]:
    """Every cached output in ``rev``'s dvc.lock with its md5 (a directory's ends in .dir)."""
    lock = yaml.safe_load(project.git("show", f"{rev}:dvc.lock"))
    return {
        out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", []) if out.get("md5")
    }


def test_push_sent_prepared_data_and_model_to_the_remote(clone):
    exps, _ = clone
    assert "files pushed" in exps.steps["push"].output, exps.steps["push"].output
    outs = lock_outs(exps.project, exps.baseline_rev)  # the workspace has moved on since: experiments
    for path in ("data/prepared", "models/checkpoint.pt", "models/export"):
        md5 = outs[path]
        stored = exps.remote / "files" / "md5" / md5[:2] / md5[2:]
        assert stored.is_file(), f"{path} ({md5}) is not in the remote {exps.remote}"


def test_fresh_clone_pulls_and_repro_has_nothing_to_do(clone):
    exps, fresh = clone
    assert fresh.git("rev-parse", "HEAD") == exps.baseline_rev
    assert "storage" in fresh.dvc("remote", "list").stdout  # the remote came with the clone
    for path in ("data/prepared", "models/checkpoint.pt"):
        assert not (fresh.root / path).exists(), f"{path} is in git: it should come from the remote"

    pull = fresh.dvc("pull")
    assert "fetched" in pull.stdout, dp.describe(pull)
    assert (fresh.root / "data" / "prepared" / "images.npy").stat().st_size > 0
    assert (fresh.root / "models" / "checkpoint.pt").stat().st_size > 0
    assert (fresh.root / "models" / "export" / "model.onnx").stat().st_size > 0

    status = fresh.dvc("status")
    assert "Data and pipelines are up to date." in status.stdout, dp.describe(status)

    repro = fresh.dvc("repro")
    assert stage_runs(repro.stdout) == set(), dp.describe(repro)
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in repro.stdout, dp.describe(repro)
    assert not (fresh.root / "mlflow.db").exists(), "nothing ran, so nothing may log to MLflow"
    assert fresh.git("status", "--porcelain") == "", "repro of a pulled clone must leave git clean"
