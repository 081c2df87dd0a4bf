"""catdog.search.space: the search space file, checked against params.yaml before any trial, and
sampled define-by-run by a real Optuna study (in memory: no DVC here)."""

from __future__ import annotations

import optuna
import pytest
import yaml

from catdog.core.params import parse_params
from catdog.search.space import SpaceError, load_space, sample, with_values

from conftest import REPO_PARAMS

BASE = yaml.safe_load(REPO_PARAMS.read_text())
BASE_FLAT = parse_params(BASE).flat()


def space(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return load_space(path, BASE).entries


def error(tmp_path, text: str) -> str:
    with pytest.raises(SpaceError) as caught:
        space(tmp_path, text)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_the_three_kinds_of_entry(tmp_path):
    entries = space(
        tmp_path,
        "train.head: [gradient, logistic]\n"
        "train.epochs: {low: 2, high: 9}\n"
        "train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n",
    )
    assert [e.key for e in entries] == ["train.head", "train.epochs", "train.lr"]
    assert entries[0].choices == ("gradient", "logistic")
    assert (entries[1].low, entries[1].high, entries[2].log) == (2, 9, True)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = sample(study.ask(), entries, BASE_FLAT)
        assert values["train.head"] in ("gradient", "logistic")
        assert isinstance(values["train.epochs"], int) and 2 <= values["train.epochs"] <= 9
        assert isinstance(values["train.lr"], float) and 1e-4 <= values["train.lr"] <= 1e-2


def test_conditional_entries_are_sampled_only_when_their_condition_holds(tmp_path):
    entries = space(
        tmp_path,
        "train.head: [gradient, logistic]\n"
        "train.logistic_c: {low: 0.001, high: 1.0, log: true, when: {train.head: logistic}}\n"
        "train.augment: {choices: [true], when: {train.mode: [head, top]}}\n",  # params.yaml: features
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    heads = set()
    for _ in range(20):
        trial = study.ask()
        values = sample(trial, entries, BASE_FLAT)
        heads.add(values["train.head"])
        assert ("train.logistic_c" in values) == (values["train.head"] == "logistic")
        assert "train.augment" not in values and set(trial.params) == set(values)
    assert heads == {"gradient", "logistic"}


def test_a_set_choice_sets_its_keys_together(tmp_path):
    entries = space(
        tmp_path,
        "model:\n  choices:\n"
        "    cnn: {train.arch: simple_cnn, train.pretrained: false, train.mode: full, data.cache_size: 64}\n"
        "    lite0: {train.arch: efficientnet_lite0}\n"
        "train.epochs: {low: 10, high: 20, when: {model: cnn}}\n",
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        values = sample(trial, entries, BASE_FLAT)
        seen.add(trial.params["model"])
        if trial.params["model"] == "cnn":
            assert values["train.mode"] == "full" and values["data.cache_size"] == 64 and "train.epochs" in values
        else:
            assert values == {"train.arch": "efficientnet_lite0"}
    assert seen == {"cnn", "lite0"}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("train.lrr: [0.1]\n", "train.lrr: unknown key: params.yaml has no such key (did you mean train.lr?)"),
        ("train.lr: {low: 0.1, high: 0.01}\n", "train.lr: empty range: low 0.1 must be below high 0.01"),
        ("train.lr: []\n", "train.lr: choices must be a non-empty list"),
        ("train.epochs: [5, ten]\n", "train.epochs: wrong value for params.yaml: train.epochs must be a valid integer"),
        ("train.lr: {low: -1, high: 1}\n", "train.lr: wrong value for params.yaml: train.lr must be greater than 0"),
        ("train.lr: {low: 0, high: 1, log: true}\n", "train.lr: log must be true or false; a log range needs low > 0"),
        ("train.lr: {low: a, high: 1}\n", "train.lr: a range needs numbers low and high"),
        ("train.lr: {low: 0.1, hi: 1}\n", "train.lr: unknown field(s) ['hi']"),
        ("train.mode: [features, half]\n", "train.mode: wrong value for params.yaml: train.mode must be 'features'"),
        ("train.lr: 0.1\n", "train.lr: must be a choice list or a range"),
        (
            "train.logistic_c: {low: 0.01, high: 1, when: {train.head: logistic}}\ntrain.head: [gradient, logistic]\n",
            "train.logistic_c: when: train.head is sampled after this entry: list train.head first",
        ),
        ("train.lr: {low: 0.01, high: 1, when: {train.hed: x}}\n", "train.lr: unknown key"),
        ("model: [a, b]\n", "model: a name without a dot is a set choice"),
        ("model: {choices: {a: {train.epochs: 0}}}\n", "model: wrong value for params.yaml: train.epochs must be"),
        ("- train.lr\n", "must map params.yaml keys"),
        ("train.lr: [0.1\n", "is not valid YAML"),
    ],
)
def test_a_bad_entry_stops_in_one_line_naming_it(tmp_path, text, says):
    assert says in error(tmp_path, text)


def test_start_points_are_drawn_first_and_the_rest_sampled(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "train.head: [gradient, logistic]\n"
        "train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n"
        "start:\n  - {train.head: logistic, train.lr: 0.005}\n  - {train.lr: 0.0002}\n"
    )
    loaded = load_space(path, BASE)
    assert [e.key for e in loaded.entries] == ["train.head", "train.lr"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=4))
    for point in loaded.start:
        study.enqueue_trial(point)  # as catdog tune does for a new study
    first, second = (sample(study.ask(), loaded.entries, BASE_FLAT) for _ in range(2))
    assert first == {"train.head": "logistic", "train.lr": 0.005}
    assert second["train.lr"] == 0.0002 and second["train.head"] in ("gradient", "logistic")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("start:\n  - {train.lrr: 0.1}\n", "start[0]: train.lrr: not an entry of the space"),
        ("start:\n  - {train.lr: 0.5}\n", "start[0]: train.lr: 0.5 is not one of its values"),
        ("start:\n  - {train.head: ridge}\n", "start[0]: train.head: 'ridge' is not one of its values"),
        ("start: {train.lr: 0.001}\n", "start: must be a list of points"),
    ],
)
def test_a_bad_start_point_stops_in_one_line_naming_it(tmp_path, text, says):
    entries = "train.head: [gradient, logistic]\ntrain.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n"
    assert says in error(tmp_path, entries + text)


def test_a_space_of_start_points_only_is_refused(tmp_path):
    assert "has no entries" in error(tmp_path, "start:\n  - {train.lr: 0.001}\n")


def test_a_missing_space_file_is_named(tmp_path):
    with pytest.raises(SpaceError, match=r"search space .*nowhere\.yaml not found"):
        load_space(tmp_path / "nowhere.yaml", BASE)


def test_the_shipped_cpu_space_loads():
    from conftest import REPO_ROOT

    shipped = load_space(REPO_ROOT / "params" / "search-cpu.yaml", BASE)
    entries = shipped.entries
    assert len(entries) >= 5 and shipped.start
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(40):  # every draw is a valid params.yaml: no trial of it is pruned
        drawn = sample(study.ask(), entries, BASE_FLAT)
        train = parse_params(with_values(BASE, drawn)).train
        if train.mode != "features" or train.head == "gradient":  # what trains by gradient: its optimiser searched
            assert {"train.epochs", "train.lr", "train.weight_decay"} <= drawn.keys(), drawn
