"""Params recipes: params/<name>.yaml holds only what differs; catdog.core.recipe applies it with dvc exp run -S."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from catdog.core import recipe
from catdog.core.errors import CatdogError
from catdog.core.params import load_params

from conftest import REPO_PARAMS, REPO_ROOT, repo_params_raw
from dvc_project import clean_env, describe, tool

RECIPES = recipe.recipe_names(REPO_ROOT)


def project_with_recipe(root, name: str, body: dict):
    shutil.copy(REPO_PARAMS, root / "params.yaml")
    (root / "params").mkdir()
    (root / "params" / f"{name}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    return root


def test_the_repository_has_the_documented_recipes():
    assert {"cpu-features", "cpu-full", "full-gpu"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_holds_only_keys_that_differ_from_params_yaml(name):
    flat = recipe.overrides(name, REPO_ROOT)  # valid merged with params.yaml, or it raises
    defaults = load_params(REPO_PARAMS).flat()
    assert flat and set(flat) <= set(defaults)
    same = sorted(key for key, value in flat.items() if defaults[key] == value)
    assert not same, f"params/{name}.yaml repeats values of params.yaml: {same} (recipes hold only what differs)"


def test_the_cpu_recipe_trains_lite2_features_on_the_full_zip():
    merged = {**load_params(REPO_PARAMS).flat(), **recipe.overrides("cpu-features", REPO_ROOT)}
    assert merged["data.source"] == "../shared/data/dogs-vs-cats/train.zip"
    assert merged["train.arch"] == "efficientnet_lite2" and merged["train.mode"] == "features"
    assert merged["data.cache_size"] >= merged["train.image_size"]


def test_printed_command_sets_every_key_with_dvc_exp_run(capsys, tmp_path, monkeypatch):
    project_with_recipe(
        tmp_path,
        "mix",
        {"data": {"limit_per_class": 7}, "train": {"weights": None, "augment": True, "mode": "head", "lr": 0.0005}},
    )
    monkeypatch.chdir(tmp_path)
    assert recipe.main(["mix"]) == 0
    assert capsys.readouterr().out.strip() == (
        "dvc exp run -S data.limit_per_class=7 -S train.weights=null -S train.augment=true "
        "-S train.mode=head -S train.lr=0.0005"
    )


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"train": {"learning_rate": 0.1}}, r"mix\.yaml: unknown key train\.learning_rate"),
        ({"trian": {"lr": 0.1}}, r"mix\.yaml: unknown key trian\b"),
        ({"train": {"lr": -1}}, r"mix\.yaml: train\.lr must be greater than 0, got -1"),
        ({"train": {"augment": True}}, r"train\.augment must be false in 'features' mode"),
    ],
)
def test_bad_recipe_is_rejected_by_key_before_anything_runs(tmp_path, body, expected):
    project_with_recipe(tmp_path, "mix", body)
    with pytest.raises(CatdogError, match=expected):
        recipe.overrides("mix", tmp_path)


def test_unknown_recipe_lists_the_known_ones(tmp_path, capsys, monkeypatch):
    project_with_recipe(tmp_path, "mix", {"train": {"lr": 0.01}})
    monkeypatch.chdir(tmp_path)
    assert recipe.main(["nope"]) == 2
    error = capsys.readouterr().err
    assert "no recipe 'nope'" in error and "known: mix" in error


@pytest.mark.slow
def test_run_queues_a_dvc_experiment_that_records_every_recipe_value(tmp_path):
    """The real dvc: ``--run --queue`` queues an experiment whose params are params.yaml + the recipe."""
    body = {
        "data": {"source": "../elsewhere/train-full.zip", "limit_per_class": 7},
        "train": {"mode": "head", "augment": True, "lr": 0.0005, "grad_clip_norm": 2.5},
        "export": {"registered_model_name": None},
    }
    root = project_with_recipe(tmp_path, "mix", body)
    (root / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "echo": {"cmd": "echo hi > out.txt", "params": ["data", "train", "export"], "outs": ["out.txt"]}
                }
            }
        )
    )
    env = clean_env(PYTHONPATH=str(REPO_ROOT / "src"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false"]
    for command in (
        ["git", "init", "-q"],
        [tool("dvc"), "init", "-q"],
        [*git, "add", "-A"],
        [*git, "commit", "-qm", "x"],
        [sys.executable, "-m", "catdog.core.recipe", "mix", "--run", "--queue", "-n", "from-recipe"],
        [tool("dvc"), "exp", "show", "--json"],
    ):
        proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, describe(proc)

    shown = json.loads(proc.stdout)
    queued = [rev for entry in shown for exp in entry.get("experiments") or [] for rev in exp["revs"]]
    assert [rev["name"] for rev in queued] == ["from-recipe"]
    recorded = queued[0]["data"]["params"]["params.yaml"]["data"]
    expected = repo_params_raw()
    for section, values in body.items():
        expected[section].update(values)
    assert {section: recorded[section] for section in body} == {section: expected[section] for section in body}
