"""Reduced-precision variants (export.precision): built beside model.onnx by export (catdog.pipeline.variants),
checked against fp32 on the whole test split, and chosen where a model runs (catdog.serving.precision).

The session ``pipeline`` exports with ``export.precision: [int8, bf16]``; every other test project
skips variants (tests/conftest.py, tests/dvc_project.py), so only these tests pay for building them.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import mlflow
import numpy as np
import onnx
import pandas as pd
import pytest
from onnx import numpy_helper

from catdog.core.paths import Paths, cache_root
from catdog.data.dataset import CachedImages, load_split
from catdog.data.transforms import eval_preset
from catdog.models.head_split import split_at_head
from catdog.models.variants import auto_order, open_runtime, quantize_int8
from catdog.pipeline import variants
from catdog.serving.precision import shipped_variants
from catdog.serving.predict import ExportedModel

from conftest import CATDOG_BIN, build_params, client_for, jpeg_bytes, run_id


def auto_precision(model_file) -> str:
    shipped = shipped_variants(model_file)
    return next(p for p in auto_order() if p in shipped or p == "fp32")


def catdog(*args: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [str(CATDOG_BIN), *args], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "dog.jpg"
    path.write_bytes(jpeg_bytes("dog", 900))
    return path


@pytest.fixture
def copy(pipeline, tmp_path):
    """The pipeline's exported folder copied, to break."""
    folder = tmp_path / "export"
    shutil.copytree(pipeline.paths.exported, folder)
    return folder


@pytest.mark.parametrize(
    "flags, order",
    [
        ({"amx_bf16", "avx512_bf16", "avx512_vnni"}, ["bf16", "int8", "fp32"]),  # Intel Xeon, Sapphire Rapids on
        ({"avx512_bf16", "avx512_vnni"}, ["int8", "bf16", "fp32"]),  # AMD EPYC Zen 4: VNNI, bf16 without AMX
        ({"avx_vnni", "avx2"}, ["int8", "fp32"]),
        ({"avx2", "fma"}, ["fp32"]),  # int8 without VNNI: little gain, saturation risk
    ],
)
def test_auto_tries_the_fastest_precision_of_the_cpu_first(flags, order):
    assert auto_order(frozenset(flags)) == order


def test_export_ships_checked_variants_with_their_figures(pipeline):
    paths = pipeline.paths
    shipped = shipped_variants(paths.onnx_model)
    assert shipped["fp32"]["file"] == "model.onnx" and shipped["int8"]["file"] == "model.int8.onnx"
    assert set(shipped) <= {"fp32", "int8", "bf16"}
    figures = json.loads(paths.parity.read_text())["variants"]
    test_size = len(load_split(paths, "test").rows)
    for name in ("int8", "bf16"):
        if name in shipped:
            assert figures[name]["shipped"] is True and figures[name]["agreement"] >= 0.995
            assert figures[name]["accuracy"] >= figures[name]["fp32_accuracy"] - 0.003
        else:  # bf16 on a CPU without bf16 units: skipped, saying why
            assert figures[name]["shipped"] is False and figures[name]["reason"].startswith("not built")
    card = paths.model_card.read_text()
    assert "## Precision variants" in card and "| int8 | `model.int8.onnx` | 1.0000 | " in card
    # timings: in MLflow and the git-ignored variant_speed.json, never in the DVC output models/export
    run = client_for(pipeline.root).get_run(run_id(paths)).data
    assert run.metrics["export/int8_agreement"] == 1.0 and run.metrics["export/fp32_images_per_s"] > 0
    assert run.tags["catdog.precisions"] == ",".join(["fp32", *(p for p in ("int8", "bf16") if p in shipped)])
    speed = json.loads(paths.variant_speed.read_text())
    assert speed["test_images"] == test_size and set(speed["images_per_s"]) >= {"fp32", "int8"}
    assert "images_per_s" not in paths.parity.read_text() + paths.variants.read_text()


def test_int8_quantisation_is_deterministic(pipeline, tmp_path):
    again = tmp_path / "again.int8.onnx"
    batches = variants.calibration_batches(pipeline.paths, 64, pipeline.params.export.calibration_images)
    quantize_int8(pipeline.paths.onnx_model, again, batches)
    assert again.read_bytes() == pipeline.paths.int8_model.read_bytes()


def test_int8_of_a_model_differing_only_in_its_head_comes_from_the_cache(pipeline, tmp_path, monkeypatch):
    """Nothing quantised depends on the fp32 head: the cached model with the new head copied in is
    what quantising the new model gives, byte for byte."""
    model = onnx.load(str(pipeline.paths.onnx_model))
    weight = next(t for t in model.graph.initializer if t.name == "head.weight")
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * -2.0, "head.weight"))
    other = tmp_path / "other.onnx"
    onnx.save(model, str(other))
    batches = variants.calibration_batches(pipeline.paths, 64, pipeline.params.export.calibration_images)
    entries = set((cache_root() / "int8").iterdir())  # export quantised the pipeline's model with these batches
    quantize_int8(other, tmp_path / "cached.int8.onnx", batches)
    assert set((cache_root() / "int8").iterdir()) == entries, "quantised again: the head is in the cache key"
    monkeypatch.setenv("CATDOG_CACHE", str(tmp_path / "empty-cache"))
    quantize_int8(other, tmp_path / "fresh.int8.onnx", batches)
    assert (tmp_path / "cached.int8.onnx").read_bytes() == (tmp_path / "fresh.int8.onnx").read_bytes()
    quantized = onnx.load(str(tmp_path / "cached.int8.onnx"))
    head = next(t for t in quantized.graph.initializer if t.name == "head.weight")
    assert (numpy_helper.to_array(head) == numpy_helper.to_array(weight)).all(), "the new head was not copied in"


def test_the_check_caches_the_backbone_and_a_new_head_runs_over_its_activations(pipeline, tmp_path):
    """Export checks each variant cut at its head: the backbone's activations over the test split are
    cached (catdog.models.head_split), so a model with another head runs no backbone; backbone then
    head computes what the whole model does."""
    paths = pipeline.paths
    test = load_split(paths, "test")
    images = CachedImages(paths, test, eval_preset(64))
    identity = variants._images_identity(paths, test)
    model = onnx.load(str(paths.int8_model))
    weight = next(t for t in model.graph.initializer if t.name == "head.weight")
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * -2.0, "head.weight"))
    other = tmp_path / "other.int8.onnx"
    onnx.save(model, str(other))
    entries = set((cache_root() / "features").iterdir())  # export checked int8 over these images
    for model_file in (paths.int8_model, other):
        cut = split_at_head(model_file, tmp_path)
        split = variants.split_logits("int8", model_file, cut, images, 64, identity)
        whole = variants._batched(open_runtime("int8", model_file), images)
        assert np.abs(split - whole).max() < 1e-4 and (split.argmax(1) == whole.argmax(1)).all()
    assert set((cache_root() / "features").iterdir()) == entries, "the backbone ran again for a new head"
    assert (split.argmax(1) != variants._batched(open_runtime("int8", paths.int8_model), images).argmax(1)).any()


def test_a_variant_that_disagrees_with_fp32_is_not_shipped(pipeline, tmp_path, capfd, monkeypatch):
    """A real int8 model whose head's class rows come out swapped: it disagrees with fp32 on every test
    image. (A near-tied head no longer breaks int8: the head stays fp32, so int8 keeps its decisions.)"""
    root = tmp_path / "project"
    for folder in ("data/prepared", "models/export"):
        shutil.copytree(pipeline.paths.root / folder, root / folder)
    paths = Paths.under(root)

    def quantize_with_swapped_rows(fp32_model, path, calibration):
        quantize_int8(fp32_model, path, calibration)
        model = onnx.load(str(path))
        for tensor in model.graph.initializer:
            if tensor.name in ("head.weight", "head.bias"):
                tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor)[::-1].copy(), tensor.name))
        onnx.save(model, str(path))

    monkeypatch.setattr(variants, "quantize_int8", quantize_with_swapped_rows)
    params = build_params({**pipeline.params.flat(), "export.precision": ["int8"]})
    report = variants.build(params, paths, load_split(paths, "test"), 64)
    assert report.shipped == [] and report.figures["int8"]["shipped"] is False
    assert report.figures["int8"]["agreement"] == 0.0
    line = capfd.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("export: int8 variant not shipped: top-1 agreement with fp32 0.") and "(export." in line
    assert not paths.int8_model.exists() and list(shipped_variants(paths.onnx_model)) == ["fp32"]


def test_predict_precision_choices(pipeline, image):
    model = str(pipeline.paths.onnx_model)
    for asked, ran in (("auto", auto_precision(pipeline.paths.onnx_model)), ("int8", "int8"), ("fp32", "fp32")):
        proc = catdog("predict", str(image), "--model", model, "--precision", asked)
        assert proc.returncode == 0 and json.loads(proc.stdout)["label"] == "dog", proc.stderr
        assert proc.stderr.strip().splitlines() == [f"catdog: 1 predicted, 0 errors, precision {ran}"]
    from_env = catdog("predict", str(image), "--model", model, CATDOG_PRECISION="int8")
    assert from_env.stderr.strip().endswith("precision int8"), from_env.stderr


def test_predict_refuses_a_variant_the_model_lacks(copy, image):
    (copy / "variants.json").write_text(json.dumps({"variants": {}}))  # as an export with precision []
    proc = catdog("predict", str(image), "--model", str(copy / "model.onnx"), "--precision", "int8")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"catdog: error: {copy / 'model.onnx'} has no int8 variant (it has fp32): use one of those, or auto"
    ]


@pytest.mark.parametrize("damage", ["missing", "corrupted"])
def test_a_broken_variant_file_is_refused_and_the_next_one_runs(copy, image, damage):
    int8 = copy / "model.int8.onnx"
    int8.unlink() if damage == "missing" else int8.write_bytes(int8.read_bytes()[:1000])
    proc = catdog("predict", str(image), "--model", str(copy / "model.onnx"), "--precision", "int8")
    assert proc.returncode == 0 and json.loads(proc.stdout)["label"] == "dog", proc.stderr
    refusal, summary = proc.stderr.strip().splitlines()
    assert refusal.startswith(f"catdog: int8 variant refused: {int8} ")
    assert refusal.endswith(f"; using {next(p for p in auto_order() if p != 'int8')}")
    assert ("is missing" if damage == "missing" else "corrupted") in refusal
    assert summary.startswith("catdog: 1 predicted, 0 errors, precision ") and not summary.endswith("int8")


def test_the_registered_model_picks_a_variant_and_catdog_precision_overrides(pipeline, monkeypatch):
    mlflow.set_tracking_uri(f"sqlite:///{pipeline.root / 'mlflow.db'}")
    dog = jpeg_bytes("dog", 901)
    for asked, ran in ((None, auto_precision(pipeline.paths.onnx_model)), ("int8", "int8"), ("fp32", "fp32")):
        if asked:
            monkeypatch.setenv("CATDOG_PRECISION", asked)
        loaded = mlflow.pyfunc.load_model("models:/catdog@champion")
        assert loaded.unwrap_python_model().model.precision == ran
        answer = loaded.predict(pd.DataFrame({"image": [dog]}))
        assert list(answer.columns) == ["label", "p_cat", "p_dog", "error"] and answer.label[0] == "dog"
        exported = ExportedModel.load(pipeline.paths.onnx_model, ran)
        expected = exported.probabilities(exported.preprocess(dog)[None])[0, 1]
        assert answer.p_dog[0] == pytest.approx(float(expected), abs=1e-6)
