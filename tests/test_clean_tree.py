"""The reproducibility claim of the README, asserted as written.

- **Same machine, same library versions: every output is bit-exact.** Two runs of the default
  pipeline (committed params, committed sample) write byte-identical ``dvc.lock`` and ``reports/``.
- **Another CPU: every code, params and data hash is equal**; float outputs (the trained weights,
  the exported model, evaluate's and train's figures) may move in their last digits, because ONNX
  Runtime and oneDNN pick other kernels on another CPU model. So a fresh clone's ``dvc repro``
  matches the committed ``dvc.lock`` exactly in every code, params and data entry (``data/prepared``
  included), and the committed reports within ``FLOAT_TOLERANCE``; where the committed files were
  made on this very machine, ``git status`` is clean.

It fails when a change to the code, params or data was committed without the results it produces
(a stale ``dvc.lock``), or when a stage writes something that differs per run (timings, run ids,
unrounded floats) into a file git or DVC tracks.
"""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess

import pytest
import yaml

from dvc_project import REPO, Project, clean_env

pytestmark = pytest.mark.slow

FIX = "run `dvc repro && git add dvc.lock reports/` and commit"
# Outputs computed in floating point: on another CPU their bytes (and so their md5 in dvc.lock) may differ.
FLOAT_STAGES = ("audit", "train", "evaluate", "export")
# A figure moves by a few units in the 6th-7th digit between CPUs; reports keep 4 decimals (catdog.core.reports).
FLOAT_TOLERANCE = 2e-3


def fresh_clone(source, target) -> Project:
    """``git clone`` of ``source``'s HEAD: committed files only, no DVC cache, no MLflow store."""
    subprocess.run(
        ["git", "clone", "--quiet", "--no-hardlinks", str(source), str(target)],
        check=True,
        capture_output=True,
        env=clean_env(),
    )
    return Project(target, clean_env(PYTHONPATH=str(target / "src")))  # the stages import the clone's code


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> Project:
    """A fresh clone of HEAD after one default ``dvc repro``."""
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout of the project")
    proj = fresh_clone(REPO, tmp_path_factory.mktemp("clean") / "clone")
    status = proj.dvc("status").stdout
    changed = [line.strip() for line in status.splitlines() if line.strip().startswith(("modified:", "new:"))]
    assert not changed, (  # only missing outputs ("deleted:", "not in cache:") are expected here
        f"a fresh clone's `dvc status` lists changed code, data or params, not only missing outputs: "
        f"the committed dvc.lock is stale; {FIX}\n{status}"
    )
    proj.repro()
    return proj


def test_every_code_params_and_data_hash_equals_the_committed_lock(reproduced):
    committed = _lock_entries(reproduced.run("git", "show", "HEAD:dvc.lock").stdout)
    produced = _lock_entries((reproduced.root / "dvc.lock").read_text())
    assert produced.keys() == committed.keys(), f"dvc.lock lists other entries than the committed one; {FIX}"
    float_outputs = {key[2] for key in committed if key[0] in FLOAT_STAGES and key[1] == "outs"}
    exact = [key for key in committed if key[2] not in float_outputs]
    assert any(key == ("train", "deps", "data/prepared") for key in exact)  # the data hash is compared
    differing = [key for key in exact if produced[key] != committed[key]]
    assert not differing, f"code, params or data hashes differ from the committed dvc.lock: {differing}; {FIX}"


def test_committed_reports_hold_the_figures_the_pipeline_produces(reproduced):
    changed = reproduced.run("git", "diff", "--name-only", "--", "reports").stdout.split()
    for name in changed:
        if name.endswith(".png"):
            continue  # drawn from the figures compared here
        committed = reproduced.run("git", "show", f"HEAD:{name}").stdout
        _assert_same_figures(_values(name, committed), _values(name, (reproduced.root / name).read_text()), name)


def test_a_second_run_on_the_same_machine_is_bit_exact(reproduced):
    """What the first run wrote, committed; then ``dvc repro -f``: not one byte differs."""
    reproduced.git("add", "-A")
    reproduced.git("commit", "-q", "--allow-empty", "-m", "first run's results")
    reproduced.dvc("repro", "-f")
    changes = reproduced.run("git", "status", "--porcelain", "--untracked-files=all").stdout
    diff = reproduced.run("git", "diff", "--stat").stdout
    assert changes == "", f"a second `dvc repro -f` on the same machine changed git-tracked files:\n{changes}\n{diff}"


def _lock_entries(text: str) -> dict[tuple[str, str, str], object]:
    """(stage, deps|outs|params, path or params file) -> its hash (or its params values)."""
    entries = {}
    for stage, body in yaml.safe_load(text)["stages"].items():
        for kind in ("deps", "outs"):
            for entry in body.get(kind, []):
                entries[(stage, kind, entry["path"])] = entry.get("md5")
        for file, values in body.get("params", {}).items():
            entries[(stage, "params", file)] = values
    return entries


def _values(name: str, text: str) -> list:
    if name.endswith(".json"):
        return _flatten(json.loads(text))
    return [cell for row in csv.reader(io.StringIO(text)) for cell in row]


def _flatten(value) -> list:
    if isinstance(value, dict):
        return [item for key in sorted(value) for item in (key, *_flatten(value[key]))]
    if isinstance(value, list):
        return [item for element in value for item in _flatten(element)]
    return [value]


def _assert_same_figures(committed: list, produced: list, name: str) -> None:
    assert len(produced) == len(committed), f"{name}: another shape than the committed file; {FIX}"
    for old, new in zip(committed, produced):
        old_number, new_number = _number(old), _number(new)
        if old_number is None or new_number is None:
            assert old == new, f"{name}: {old!r} became {new!r}; {FIX}"
        else:
            assert math.isclose(old_number, new_number, abs_tol=FLOAT_TOLERANCE), (
                f"{name}: {old} became {new}, more than a CPU's rounding; {FIX}"
            )


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
