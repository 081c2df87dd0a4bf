"""The committed ``dvc.lock`` and ``reports/`` are exactly what the pipeline produces.

A fresh ``git clone`` of HEAD runs the default pipeline (committed params, committed sample) with
``dvc repro``; afterwards ``git status --porcelain`` must be empty. It fails when a change to the
code, params or data was committed without the results it produces, or when a stage writes
something that differs per run or per machine (timings, run ids, unrounded floats) into a file
git or DVC tracks.
"""

from __future__ import annotations

import subprocess

import pytest

from dvc_project import REPO, Project, clean_env

pytestmark = pytest.mark.slow

FIX = "run `dvc repro && git add dvc.lock reports/` and commit"


def fresh_clone(source, target) -> Project:
    """``git clone`` of ``source``'s HEAD: committed files only, no DVC cache, no MLflow store."""
    subprocess.run(
        ["git", "clone", "--quiet", "--no-hardlinks", str(source), str(target)],
        check=True,
        capture_output=True,
        env=clean_env(),
    )
    return Project(target, clean_env(PYTHONPATH=str(target / "src")))  # the stages import the clone's code


def test_default_pipeline_in_a_fresh_clone_leaves_git_status_clean(tmp_path):
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout of the project")
    proj = fresh_clone(REPO, tmp_path / "clone")
    status = proj.dvc("status").stdout
    changed = [line.strip() for line in status.splitlines() if line.strip().startswith(("modified:", "new:"))]
    assert not changed, (  # only missing outputs ("deleted:", "not in cache:") are expected here
        f"a fresh clone's `dvc status` lists changed code, data or params, not only missing outputs: "
        f"the committed dvc.lock is stale; {FIX}\n{status}"
    )
    proj.repro()
    changes = proj.run("git", "status", "--porcelain", "--untracked-files=all").stdout
    diff = proj.run("git", "diff", "--stat").stdout
    assert changes == "", (
        f"`dvc repro` of the default pipeline in a fresh clone changed git-tracked files: the committed "
        f"dvc.lock and reports/ are not what the pipeline produces; {FIX}.\n{changes}\n{diff}"
    )
