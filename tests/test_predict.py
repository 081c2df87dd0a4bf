"""`catdog predict` as a real subprocess on the model exported by the session ``pipeline`` fixture."""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catdog import cli
from catdog.serving.predict import ExportedModel, expand_paths, predict

from conftest import CATDOG_BIN, encode, jpeg_bytes, seed_store, synthetic_image


def catdog(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(CATDOG_BIN), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.fixture
def model_file(pipeline) -> str:
    return str(pipeline.paths.exported / "model.onnx")


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    """A good dog, a folder (2 cats, a PNG dog, a text file and a hidden file), a broken JPEG,
    a non-image and a missing path."""
    good = tmp_path / "dog.jpg"
    good.write_bytes(jpeg_bytes("dog", 500))
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "b_cat.jpg").write_bytes(jpeg_bytes("cat", 501))
    (folder / "sub" / "a_cat.JPEG").write_bytes(jpeg_bytes("cat", 502))
    (folder / "c_dog.png").write_bytes(encode(synthetic_image("dog", 503), "PNG"))
    (folder / "notes.txt").write_text("not an image, and no image suffix: skipped\n")
    (folder / ".hidden.jpg").write_bytes(jpeg_bytes("cat", 504))
    broken = tmp_path / "broken.jpg"
    whole = jpeg_bytes("cat", 505, size=(120, 100))
    broken.write_bytes(whole[: len(whole) // 2])
    text = tmp_path / "readme.jpg"
    text.write_text("I am text with a .jpg name\n")
    return {"good": good, "folder": folder, "broken": broken, "text": text, "missing": tmp_path / "nope.jpg"}


def test_predict_cli_mixed_inputs(model_file, inputs):
    proc = catdog(
        "predict",
        str(inputs["good"]),
        str(inputs["folder"]),
        str(inputs["broken"]),
        str(inputs["text"]),
        str(inputs["missing"]),
        "--model",
        model_file,
    )
    assert proc.returncode == 0, proc.stderr
    results = json_lines(proc.stdout)
    folder = inputs["folder"]
    expected_paths = [
        inputs["good"],
        folder / "b_cat.jpg",
        folder / "c_dog.png",
        folder / "sub" / "a_cat.JPEG",
        inputs["broken"],
        inputs["text"],
        inputs["missing"],
    ]
    assert [r["path"] for r in results] == [str(p) for p in expected_paths]  # input order, folders sorted

    good = results[:4]
    for result, label in zip(good, ["dog", "cat", "dog", "cat"]):
        assert set(result) == {"path", "label", "confidence"}
        assert result["label"] == label, result
        assert 0.5 <= result["confidence"] <= 1.0

    broken, text, missing = results[4:]
    assert set(broken) == {"path", "error"} and broken["error"].startswith("corrupt")
    assert text["error"].startswith("not_an_image")
    assert missing["error"] == "no such file"


def test_predict_cli_exits_non_zero_when_nothing_was_predicted(model_file, inputs):
    proc = catdog("predict", str(inputs["broken"]), str(inputs["missing"]), "--model", model_file)
    assert proc.returncode == 1
    results = json_lines(proc.stdout)
    assert len(results) == 2 and all("error" in r for r in results)


def test_predict_cli_missing_model_is_a_one_line_error(tmp_path, inputs):
    proc = catdog("predict", str(inputs["good"]), "--model", str(tmp_path / "none" / "model.onnx"))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("catdog: error: model ") and "not found" in lines[0]


def test_predict_cli_default_model_is_the_projects_from_any_subfolder(pipeline, inputs, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(pipeline.paths.exported, project / "models" / "export")
    (project / "dvc.yaml").write_text("stages: {}\n")
    (project / "data" / "deep").mkdir(parents=True)
    for cwd in (project, project / "data" / "deep"):
        proc = catdog("predict", str(inputs["good"]), cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        assert json_lines(proc.stdout)[0]["label"] == "dog"
    elsewhere = catdog("predict", str(inputs["good"]), cwd=tmp_path)
    assert elsewhere.returncode == 2 and elsewhere.stdout == ""
    assert elsewhere.stderr.strip().splitlines() == [
        (
            f"catdog: error: no catdog project here (no dvc.yaml in {tmp_path} or above): "
            "pass --model PATH|models:/NAME@ALIAS"
        )
    ]


def test_catdog_version_and_help():
    version = catdog("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"catdog {importlib.metadata.version('catdog')}"
    usage = catdog("--help")
    assert usage.returncode == 0
    (commands,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for command in commands._choices_actions:  # every subcommand, with its one-line help
        assert command.help and "\n" not in command.help
        assert re.search(rf"^\s+{command.dest}\s+{re.escape(command.help)}$", usage.stdout, re.MULTILINE), usage.stdout


def test_model_without_its_labels_file_is_a_clear_error(pipeline, tmp_path):
    lonely = tmp_path / "model.onnx"
    shutil.copy(pipeline.paths.exported / "model.onnx", lonely)
    from catdog.core.errors import CatdogError

    with pytest.raises(CatdogError, match=r"labels\.json not found"):
        ExportedModel.load(lonely)


def test_predict_cli_corrupt_model_is_a_one_line_error(pipeline, inputs, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(pipeline.paths.exported, folder)
    (folder / "model.onnx").write_bytes(b"this is not an onnx file")
    proc = catdog("predict", str(inputs["good"]), "--model", str(folder / "model.onnx"))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("catdog: error:")


def test_predictions_match_evaluate_on_the_test_images(pipeline, tmp_path):
    """Same decode, same model: `catdog predict` on the raw test files agrees with evaluate."""
    rows = list(csv.DictReader((pipeline.paths.evaluate_reports / "predictions.csv").open(newline="")))
    folder = tmp_path / "test-images"
    with zipfile.ZipFile(pipeline.dataset.zip) as archive:
        for row in rows:
            target = folder / row["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(row["path"]))
    model = ExportedModel.load(pipeline.paths.exported / "model.onnx")
    files = [folder / row["path"] for row in rows]
    results = list(predict(model, files, batch_size=3))  # several batches
    assert len(results) == len(rows)
    for row, result in zip(rows, results):
        assert result["path"] == str(folder / row["path"])
        assert result["label"] == row["predicted"]
        assert result["confidence"] == pytest.approx(float(row["confidence"]), abs=1e-3)


def test_predict_in_process_handles_odd_images(pipeline, tmp_path):
    model = ExportedModel.load(pipeline.paths.exported / "model.onnx")
    assert model.classes == ["cat", "dog"] and model.image_size == 64 and model.cache_size == 64
    assert model.min_image_size == pipeline.params.data.min_image_size
    files = {
        "gray.png": encode(Image.new("L", (70, 60), 90), "PNG"),
        "rgba.png": encode(synthetic_image("dog", 600).convert("RGBA"), "PNG"),
        "big_cat.jpg": jpeg_bytes("cat", 601, size=(400, 300)),
        "empty.jpg": b"",
        "tiny.png": encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "a_dir.jpg").mkdir()
    results = {Path(r["path"]).name: r for r in predict(model, [tmp_path / n for n in [*files, "a_dir.jpg"]])}
    assert results["gray.png"]["label"] in {"cat", "dog"}
    assert results["rgba.png"]["label"] == "dog"
    assert results["big_cat.jpg"]["label"] == "cat"
    assert results["empty.jpg"]["error"].startswith("empty")
    assert results["tiny.png"]["error"].startswith("too_small")  # what prepare refuses, predict refuses
    assert results["a_dir.jpg"]["error"] == "is a directory"


def test_predict_streams_decoding_at_most_two_batches_ahead(pipeline, tmp_path):
    model = ExportedModel.load(pipeline.paths.exported / "model.onnx")
    listed = []

    def files():  # a lazy listing: predict never holds more than the batches in flight
        for index in range(40):
            path = tmp_path / f"{index}.jpg"
            path.write_bytes(jpeg_bytes("cat" if index % 2 else "dog", index))
            listed.append(path)
            yield path

    results = predict(model, files(), batch_size=4)
    first = next(results)
    assert first["path"] == str(tmp_path / "0.jpg") and 4 <= len(listed) <= 12
    rest = list(results)
    assert [r["path"] for r in [first, *rest]] == [str(p) for p in listed] and len(listed) == 40


def test_expand_paths(tmp_path):
    (tmp_path / "d" / "x").mkdir(parents=True)
    for name in ("d/b.jpg", "d/a.PNG", "d/x/c.webp", "d/notes.txt", "d/.hidden.jpg", "lone.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "d" / ".git").mkdir()
    (tmp_path / "d" / ".git" / "obj.jpg").write_bytes(b"")
    files = expand_paths([str(tmp_path / "lone.txt"), str(tmp_path / "d"), str(tmp_path / "missing.jpg")])
    assert files == [
        tmp_path / "lone.txt",
        tmp_path / "d" / "a.PNG",
        tmp_path / "d" / "b.jpg",
        tmp_path / "d" / "x" / "c.webp",
        tmp_path / "missing.jpg",
    ]


def test_predict_cli_table_format(model_file, inputs):
    proc = catdog("predict", str(inputs["good"]), str(inputs["missing"]), "--model", model_file, "--format", "table")
    assert proc.returncode == 0, proc.stderr
    header, good, missing = proc.stdout.splitlines()
    assert header.split() == ["label", "confidence", "path"]
    label, confidence, path = good.split()
    assert label == "dog" and 0.5 <= float(confidence) <= 1 and path == str(inputs["good"])
    assert missing.split()[0] == "error" and missing.endswith(f"{inputs['missing']}: no such file")


def test_predict_cli_globs(model_file, inputs, tmp_path):
    pattern = str(inputs["folder"] / "**" / "*_cat.*")
    proc = catdog("predict", pattern, str(tmp_path / "nothing-*.jpg"), "--model", model_file)
    assert proc.returncode == 0, proc.stderr
    results = json_lines(proc.stdout)
    assert [r["path"] for r in results] == [
        str(inputs["folder"] / "b_cat.jpg"),
        str(inputs["folder"] / "sub" / "a_cat.JPEG"),
        str(tmp_path / "nothing-*.jpg"),
    ]
    assert [r.get("label") for r in results[:2]] == ["cat", "cat"]
    assert results[2]["error"] == "no file matches this pattern"


def test_tta_averages_with_the_mirrored_image(pipeline):
    model = ExportedModel.load(pipeline.paths.exported / "model.onnx")
    batch = np.stack([model.preprocess(jpeg_bytes(label, 700 + i)) for i, label in enumerate(["cat", "dog", "cat"])])
    plain = model.probabilities(batch)
    mirrored = model.probabilities(np.ascontiguousarray(batch[..., ::-1]))
    tta = model.probabilities(batch, tta=True)
    np.testing.assert_allclose(tta, (plain + mirrored) / 2, atol=1e-6)
    np.testing.assert_allclose(tta.sum(1), 1, atol=1e-6)
    assert not np.allclose(tta, plain, atol=1e-7)
    # and the CLI flag reaches it
    image = pipeline.root / "tta-dog.jpg"
    image.write_bytes(jpeg_bytes("dog", 800))
    with_tta = json_lines(
        catdog(
            "predict",
            str(image),
            "--tta",
            "--precision",
            "fp32",
            "--model",
            str(pipeline.paths.exported / "model.onnx"),
        ).stdout
    )[0]
    expected = model.probabilities(model.preprocess(image.read_bytes())[None], tta=True)[0]
    assert with_tta["confidence"] == pytest.approx(float(expected.max()), abs=1e-5)


def test_predict_from_the_model_registry(pipeline, inputs):
    proc = catdog(
        "predict",
        str(inputs["good"]),
        str(inputs["folder"] / "b_cat.jpg"),
        "--model",
        "models:/catdog@champion",
        cwd=pipeline.root,
    )  # the project's store
    assert proc.returncode == 0, proc.stderr
    assert [r["label"] for r in json_lines(proc.stdout)] == ["dog", "cat"]


def test_unknown_registry_model_is_a_one_line_error(mlflow_template, inputs, tmp_path):
    db = seed_store(mlflow_template, tmp_path / "store")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    proc = subprocess.run(
        [str(CATDOG_BIN), "predict", str(inputs["good"]), "--model", "models:/nope@champion"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("catdog: error: cannot load models:/nope@champion")


def test_registry_uri_outside_a_project_creates_nothing(inputs, tmp_path):
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    proc = catdog("predict", str(inputs["good"]), "--model", "models:/catdog@champion", cwd=workdir)
    assert proc.returncode == 2
    assert list(workdir.iterdir()) == []
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_predict_cli_top_k_lists_the_best_labels_and_clamps_to_the_class_count(model_file, inputs):
    proc = catdog("predict", str(inputs["good"]), str(inputs["missing"]), "--model", model_file, "--top-k", "5")
    assert proc.returncode == 0, proc.stderr
    good, missing = json_lines(proc.stdout)  # strict JSON: json.loads of each line
    assert [c["label"] for c in good["top_k"]] == ["dog", "cat"]  # 5 > 2 classes: all of them, best first
    assert good["top_k"][0] == {"label": good["label"], "probability": good["confidence"]}
    assert sum(c["probability"] for c in good["top_k"]) == pytest.approx(1.0, abs=1e-5)
    assert "top_k" not in missing and missing["error"] == "no such file"
    one = json_lines(catdog("predict", str(inputs["good"]), "--model", model_file, "--top-k", "1").stdout)[0]
    assert one["top_k"] == good["top_k"][:1]
    refused = catdog("predict", str(inputs["good"]), "--model", model_file, "--top-k", "0")
    assert refused.returncode == 2 and "--top-k: must be a whole number of at least 1, got '0'" in refused.stderr


def test_predict_cli_top_k_table(model_file, inputs):
    args = ("predict", str(inputs["good"]), str(inputs["missing"]), "--model", model_file, "--format", "table")
    proc = catdog(*args, "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    header, good, missing = proc.stdout.splitlines()
    assert header.split() == ["label", "confidence", "top_k", "path"]
    label, confidence, first, p_first, second, p_second, path = good.split()
    assert (label, first, second) == ("dog", "dog", "cat") and path == str(inputs["good"])
    assert float(p_first) == pytest.approx(float(confidence)) and float(p_first) + float(p_second) == pytest.approx(1)
    assert header.index("path") == good.index(path) == missing.index(str(inputs["missing"]))  # aligned columns
    assert missing.split()[0] == "error" and missing.endswith("no such file")


def test_a_file_over_the_exported_byte_cap_is_too_large(pipeline, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(pipeline.paths.exported, folder)
    preprocess = json.loads((folder / "preprocess.json").read_text())
    (folder / "preprocess.json").write_text(json.dumps({**preprocess, "max_image_bytes": 20_000}))
    big, small = tmp_path / "big.jpg", tmp_path / "small.jpg"
    big.write_bytes(jpeg_bytes("cat", 610, size=(400, 300)))
    small.write_bytes(jpeg_bytes("cat", 611))
    assert big.stat().st_size > 20_000 > small.stat().st_size
    proc = catdog("predict", str(big), str(small), "--model", str(folder / "model.onnx"))
    assert proc.returncode == 0, proc.stderr
    too_large, fine = json_lines(proc.stdout)
    assert too_large["error"] == f"too_large: {big.stat().st_size} bytes > 20000 (data.max_image_bytes)"
    assert fine["label"] == "cat"
