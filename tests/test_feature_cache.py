"""The content-addressed frozen-feature cache (catdog.models.feature_cache, catdog.pipeline.features) and
the default head (``train.head: auto``, ``train.logistic_c: auto``) on real training runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from catdog.core.paths import cache_root
from catdog.data.dataset import CachedImages, load_split, make_loader
from catdog.data.transforms import eval_preset
from catdog.models.device import resolve_runtime
from catdog.models.engine import predict_probabilities
from catdog.models.factory import load_checkpoint
from catdog.models.feature_cache import cached_features, entry_path, feature_key
from catdog.models.frozen import inference_module, split_for_training
from catdog.models.linear_probe import C_GRID, C_TOLERANCE, choose_c
from catdog.pipeline import evaluate, train
from catdog.pipeline.features import features_of

from conftest import build_params, client_for, seed_store
from prepared_classes import write_prepared

CLASSES = {"ant": 10, "bee": 10, "cow": 10}  # more than two: the multinomial logistic head


@pytest.fixture
def three_classes(tmp_path, mlflow_template):
    """data/prepared of 3 classes (32 px, images of their own: a key no other test's images share)."""
    paths = write_prepared(tmp_path, CLASSES, size=32, seed=2626)
    seed_store(mlflow_template, tmp_path)
    defaults = {"data.source": "unused", "data.cache_size": 32, "train.image_size": 32, "train.head": "auto"}
    return paths, lambda **overrides: build_params({**defaults, **overrides})


def _feature_entries() -> set:
    return set((cache_root() / "features").glob("*.npy"))


def test_features_are_computed_once_then_shared_by_experiments_and_evaluate(three_classes, capsys):
    paths, params = three_classes
    before = _feature_entries()
    first = train.run(params(), paths)
    out = capsys.readouterr().out
    (entry,) = _feature_entries() - before
    assert "computed, cached" in out and "head logistic" in out and first["best_epoch"] == 1
    stamp = entry.stat().st_mtime_ns
    assert np.load(entry).shape[0] == len(np.load(paths.images, mmap_mode="r"))  # every row, test included
    _assert_c_chosen_on_val_and_logged(paths, params())

    # another experiment on the same backbone and images: the features are read, not computed
    train.run(params(**{"train.dropout": 0.1, "train.lr": 0.01}), paths)
    out = capsys.readouterr().out
    assert "from the cache" in out and "computed" not in out and entry.stat().st_mtime_ns == stamp

    # evaluate runs only the head on the cached test rows: the whole model's probabilities
    model, config = load_checkpoint(paths.checkpoint)
    runtime, test = resolve_runtime("fp32"), load_split(paths, "test")
    cached, targets = evaluate.test_probabilities(model, config, paths, test, params().evaluate, runtime)
    loader = make_loader(CachedImages(paths, test, eval_preset(32)), 16, 0)
    whole, _ = predict_probabilities(inference_module(model, config["arch"], 32, runtime), loader, runtime, False, "t")
    assert torch.allclose(cached, whole, atol=1e-5) and targets.tolist() == test.labels.tolist()

    # a damaged entry: said in one line, computed again, the same features
    expected = np.load(entry)
    entry.write_bytes(entry.read_bytes()[:-100])
    frozen, _ = split_for_training(model, config["arch"], 32, "features", 0, runtime)
    again = features_of(frozen, paths, batch_size=16, workers=0)
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "damaged" in line] == [
        f"features: cache entry {entry} is damaged (md5 mismatch): computing it again"
    ]
    assert (
        "computed, cached" in out and np.allclose(again, expected, atol=1e-5) and np.array_equal(np.load(entry), again)
    )


def _assert_c_chosen_on_val_and_logged(paths, params) -> None:
    """train.logistic_c auto: a C of the grid, the one of lowest val log loss, as MLflow facts (not metrics)."""
    client = client_for(paths.root)
    (run,) = client.search_runs([client.get_experiment_by_name(params.tracking.experiment_name).experiment_id])
    chosen, losses = (
        float(run.data.tags["catdog.logistic_c"]),
        json.loads(run.data.tags["catdog.logistic_c_val_log_loss"]),
    )
    assert len(losses) == len(C_GRID) and chosen in C_GRID and run.data.params["train.logistic_c"] == "auto"
    best = min(losses.values())  # the strongest penalty within the tolerance of the best
    assert losses[f"{chosen:g}"] <= best * (1 + C_TOLERANCE) + 1e-5
    assert all(loss > best * (1 + C_TOLERANCE) - 1e-5 for c, loss in losses.items() if float(c) < chosen)
    assert json.loads(paths.train_metrics.read_text()).keys() == {"best_epoch", "val_accuracy", "val_loss"}


def test_choose_c_prefers_stronger_penalty_for_noisy_features_and_weaker_for_clean_ones():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 150)
    centres = rng.normal(0, 1, (3, 20))
    picks = {}
    for noise in (0.3, 8.0):
        features = torch.from_numpy(centres[labels] + rng.normal(0, noise, (150, 20)))
        split = [(features[part], torch.from_numpy(labels[part])) for part in (slice(0, 100), slice(100, None))]
        picks[noise], losses = choose_c(*split)
        best = min(losses.values())
        assert picks[noise] in C_GRID and losses[picks[noise]] <= best * (1 + C_TOLERANCE)
    assert picks[0.3] > picks[8.0], picks


def test_cache_entry_round_trip_and_a_missing_checksum_recomputes(monkeypatch, tmp_path):
    monkeypatch.setenv("CATDOG_CACHE", str(tmp_path))
    key, calls = feature_key("graph", 32, "eval", "onnx-fp32", "md5"), []

    def compute():
        calls.append(1)
        return np.arange(12, dtype=np.float64).reshape(4, 3)

    first, hit = cached_features(key, 4, compute)
    again, hit_again = cached_features(key, 4, compute)
    assert (
        (hit, hit_again, len(calls)) == (False, True, 1) and again.dtype == np.float32 and np.array_equal(first, again)
    )
    entry_path(key).with_suffix(".json").unlink()  # an array without its checksum is not trusted
    assert cached_features(key, 4, compute)[1] is False and len(calls) == 2
    assert cached_features(key, 5, compute)[1] is False  # another row count: not these images
    assert feature_key("graph", 32, "eval", "onnx-bf16", "md5") != key
