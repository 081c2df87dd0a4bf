"""The registered model is an MLflow pyfunc that takes encoded images (catdog.serving)."""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from catdog import serving
from catdog.predict import ExportedModel

from conftest import client_for, jpeg_bytes
from dvc_project import clean_env, free_port, stop, tool, wait_for_http


@pytest.fixture
def champion(pipeline):
    mlflow.set_tracking_uri(f"sqlite:///{pipeline.root / 'mlflow.db'}")
    return mlflow.pyfunc.load_model("models:/catdog@champion")


def test_champion_classifies_encoded_images_with_a_per_row_error(champion, pipeline):
    dog, cat = jpeg_bytes("dog", 700), jpeg_bytes("cat", 701)
    images = [
        dog,
        cat[: len(cat) // 2],
        base64.b64encode(cat).decode(),
        b"",
        "not base64!",
        b"%PDF-1.4 no image",
        jpeg_bytes("cat", 702, size=(16, 16)),
    ]
    result = champion.predict(pd.DataFrame({"image": images}))

    assert list(result.columns) == ["label", "p_cat", "p_dog", "error"]
    assert result.label[0] == "dog" and result.label[2] == "cat"
    assert result.error[[0, 2]].isna().all()
    assert result.error[1].startswith("corrupt") and result.error[3].startswith("empty")
    assert result.error[4].startswith("not_base64") and result.error[5].startswith("not_an_image")
    assert result.error[6].startswith("too_small")  # below data.min_image_size, as prepare
    assert result.label[[1, 3, 4, 5, 6]].isna().all() and result.p_dog[[1, 3, 4, 5, 6]].isna().all()
    # the same preprocessing and numbers as `catdog predict`
    exported = ExportedModel.load(pipeline.paths.exported / "model.onnx")
    expected = exported.probabilities(exported.preprocess(dog)[None])[0]
    assert result.loc[0, ["p_cat", "p_dog"]].tolist() == pytest.approx(expected.tolist(), abs=1e-6)


def test_registered_model_carries_signature_example_and_pinned_requirements(pipeline):
    client = client_for(pipeline.root)
    version = client.get_model_version_by_alias("catdog", "champion")
    folder = Path(
        mlflow.artifacts.download_artifacts(version.source, tracking_uri=f"sqlite:///{pipeline.root / 'mlflow.db'}")
    )
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert inputs == [{"type": "binary", "name": "image", "required": True}]
    assert [c["name"] for c in json.loads(mlmodel["signature"]["outputs"])] == ["label", "p_cat", "p_dog", "error"]

    example = json.loads((folder / "input_example.json").read_text())
    jpeg = base64.b64decode(example["data"][0][0])
    assert jpeg[:3] == b"\xff\xd8\xff" and len(jpeg) <= 100_000  # one real JPEG
    assert all(f.stat().st_size < 200_000 for f in folder.glob("*.json"))

    requirements = (folder / "requirements.txt").read_text().split()
    for package in ("mlflow", "onnxruntime", "numpy", "pandas", "pillow"):
        assert any(r.startswith(f"{package}==") for r in requirements), requirements
    assert {"model.onnx", "labels.json", "preprocess.json"} <= {f.name for f in (folder / "artifacts").iterdir()}
    assert (folder / "code" / "catdog" / "serving.py").is_file()  # loadable where catdog is not installed


def test_classify_in_process_on_the_exported_model(pipeline):
    model = ExportedModel.load(pipeline.paths.exported / "model.onnx")
    images = [jpeg_bytes("cat", 710 + i) for i in range(serving.BATCH_SIZE + 3)]  # more than one batch
    result = serving.classify(model, images)
    assert len(result) == len(images) and result.error.isna().all()
    assert (result.label == "cat").mean() > 0.9
    assert (result.p_cat + result.p_dog).tolist() == pytest.approx([1.0] * len(images))


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_posted_jpeg_with_its_label(pipeline, tmp_path):
    """The README's commands: `mlflow models serve` as a real process on loopback, then curl's POST."""
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as handle:
        server = subprocess.Popen(
            [
                tool("mlflow"),
                "models",
                "serve",
                "-m",
                "models:/catdog@champion",
                "--env-manager",
                "local",
                "-p",
                str(port),
                "-h",
                "127.0.0.1",
                "-w",
                "1",
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            start_new_session=True,
            env=clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{pipeline.root / 'mlflow.db'}"),
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, timeout=180, log=log)
        body = {
            "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(jpeg_bytes("dog", 720)).decode()]]}
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = json.loads(response.read())["predictions"]
    finally:
        stop(server)
    assert len(predictions) == 1 and predictions[0]["label"] == "dog", predictions
    assert predictions[0]["p_dog"] > 0.5 and predictions[0]["error"] is None
    assert server.poll() is not None
