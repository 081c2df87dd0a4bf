"""The registered model is an MLflow pyfunc that takes encoded images (catdog.serving.pyfunc)."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from test_export import THREE_CLASS_CAP, THREE_CLASSES, class_jpeg, export_three_classes

from catdog.data.images import BadImage
from catdog.models.variants import auto_order
from catdog.serving import pyfunc
from catdog.serving.precision import shipped_variants
from catdog.serving.predict import ExportedModel

from conftest import CATDOG_BIN, client_for, jpeg_bytes
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
        "%%%%",  # MLflow's own base64 decoding drops these and answered empty bytes
        None,
    ]
    result = champion.predict(pd.DataFrame({"image": images}))

    assert list(result.columns) == ["label", "p_cat", "p_dog", "error"]
    assert result.label[0] == "dog" and result.label[2] == "cat"
    assert result.error[[0, 2]].isna().all()
    causes = [error.split(":")[0] for error in result.error[1:] if error is not None]
    assert causes == ["corrupt", "empty", "not_base64", "not_an_image", "too_small", "not_base64", "empty"]
    assert result.error[6].startswith("too_small")  # below data.min_image_size, as prepare
    bad = [1, 3, 4, 5, 6, 7, 8]
    # None, not NaN: the scoring server writes NaN as the invalid JSON `NaN`
    assert all(result.loc[i, column] is None for i in bad for column in ("label", "p_cat", "p_dog"))
    assert result.loc[0, "error"] is None and set(result.dtypes) == {np.dtype(object)}
    # the same preprocessing and numbers as `catdog predict` at the precision it chose (auto: a variant here)
    ran = champion.unwrap_python_model().model.precision
    assert ran == auto_precision(pipeline.paths.exported / "model.onnx")
    exported = ExportedModel.load(pipeline.paths.exported / "model.onnx", ran)
    expected = exported.probabilities(exported.preprocess(dog)[None])[0]
    assert result.loc[0, ["p_cat", "p_dog"]].tolist() == pytest.approx(expected.tolist(), abs=1e-6)


@pytest.mark.parametrize(
    "text",
    [
        "%%%%",
        "YWJ",  # padding missing
        "YWJj==",  # padding past a full group
        "YWJ=",  # not canonical: the last character carries bits that padding drops
        "YW-_",  # the URL-safe alphabet
        "YWJj=YWJj",  # padding in the middle
        "YWJjé",  # not ASCII
    ],
)
def test_a_string_that_is_not_strict_base64_is_refused_as_not_base64(text):
    with pytest.raises(BadImage) as refused:
        pyfunc.decode_base64(text)
    assert refused.value.reason == "not_base64"


def test_base64_line_breaks_and_spaces_carry_no_data():
    jpeg = jpeg_bytes("cat", 730)
    assert pyfunc.decode_base64(base64.encodebytes(jpeg).decode()) == jpeg  # `base64` without -w0: 76-char lines
    assert pyfunc.decode_base64(f"  {base64.b64encode(jpeg).decode()}\r\n") == jpeg
    assert pyfunc.decode_base64("") == b""  # then refused as empty, like a zero-byte file


def test_registered_model_carries_signature_example_and_pinned_requirements(pipeline):
    client = client_for(pipeline.root)
    version = client.get_model_version_by_alias("catdog", "champion")
    folder = Path(
        mlflow.artifacts.download_artifacts(version.source, tracking_uri=f"sqlite:///{pipeline.root / 'mlflow.db'}")
    )
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert inputs == [{"type": "string", "name": "image", "required": True}]  # base64; MLflow would decode binary
    assert [c["name"] for c in json.loads(mlmodel["signature"]["outputs"])] == ["label", "p_cat", "p_dog", "error"]

    example = json.loads((folder / "input_example.json").read_text())
    jpeg = base64.b64decode(example["data"][0][0])
    assert jpeg[:3] == b"\xff\xd8\xff" and len(jpeg) <= 100_000  # one real JPEG
    assert all(f.stat().st_size < 200_000 for f in folder.glob("*.json"))

    requirements = (folder / "requirements.txt").read_text().split()
    for package in ("mlflow", "onnxruntime", "numpy", "pandas", "pillow"):
        assert any(r.startswith(f"{package}==") for r in requirements), requirements
    artifacts = {"model.onnx", "model.pt2", "labels.json", "preprocess.json", "variants.json", "model.int8.onnx"}
    assert artifacts <= {f.name for f in (folder / "artifacts").iterdir()}
    # each model file stored once: the int8 variant has its own, bf16 compiles model.onnx
    assert sorted(f.name for f in folder.rglob("*.onnx")) == ["model.int8.onnx", "model.onnx"]
    shipped = json.loads((folder / "artifacts" / "variants.json").read_text())["variants"]
    assert any(r.startswith("openvino==") for r in requirements) == ("bf16" in shipped), requirements
    assert (folder / "code" / "catdog" / "serving" / "predict.py").is_file()  # loadable where catdog is not installed
    assert not (folder / "code" / "catdog" / "serving" / "pyfunc.py").exists()  # stored once, as the model's code


# Run where catdog is not installed: no sys.path entry that holds a catdog package (the editable
# install's, PYTHONPATH's), MLflow's unpickling refused; prints where catdog came from and the answer.
LOAD_WITHOUT_CATDOG = """
import json, sys
from pathlib import Path
sys.path[:] = [p for p in sys.path if not (Path(p or ".") / "catdog").is_dir()]
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/catdog@champion")
answer = model.predict(pd.DataFrame({"image": [Path("dog.jpg").read_bytes()]})).iloc[0]
print(json.dumps({"catdog": sys.modules["catdog"].__file__, "label": answer.label, "error": answer.error}))
"""


def test_the_registered_model_is_its_code_not_a_pickle(pipeline, tmp_path):
    """MLflow's models from code: the model holds catdog/serving/pyfunc.py, no pickle, and loads with
    unpickling refused, from its own copy of catdog."""
    folder = Path(
        mlflow.artifacts.download_artifacts(
            "models:/catdog@champion", tracking_uri=f"sqlite:///{pipeline.root / 'mlflow.db'}"
        )
    )
    assert not [f for f in folder.rglob("*") if f.suffix in (".pkl", ".pickle", ".cloudpickle")]
    flavour = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavour["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavour
    assert (folder / Path(flavour["model_code_path"]).name).read_text() == Path(pyfunc.__file__).read_text()

    (tmp_path / "dog.jpg").write_bytes(jpeg_bytes("dog", 740))
    env = clean_env(
        MLFLOW_TRACKING_URI=f"sqlite:///{pipeline.root / 'mlflow.db'}",
        MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false",  # MLflow refuses to load a pickled pyfunc
        PYTHONPATH="",
    )
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_CATDOG], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.splitlines()[-1])
    assert Path(loaded["catdog"]).parts[-3:] == ("code", "catdog", "__init__.py"), loaded  # the model's copy
    assert loaded["label"] == "dog" and loaded["error"] is None, loaded
    assert "CloudPickle" not in proc.stderr and "pickle" not in proc.stderr.lower(), proc.stderr


def test_classify_in_process_on_the_exported_model(pipeline):
    model = ExportedModel.load(pipeline.paths.exported / "model.onnx")
    images = [jpeg_bytes("cat", 710 + i) for i in range(pyfunc.BATCH_SIZE + 3)]  # more than one batch
    result = pyfunc.classify(model, images)
    assert len(result) == len(images) and result.error.isna().all()
    assert (result.label == "cat").mean() > 0.9
    assert (result.p_cat.astype(float) + result.p_dog.astype(float)).tolist() == pytest.approx([1.0] * len(images))


@contextlib.contextmanager
def served(store: Path, log: Path) -> Iterator[str]:
    """The README's command: `mlflow models serve` of models:/catdog@champion as a real process on
    loopback; yields its /invocations URL."""
    port = free_port()
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
            cwd=log.parent,
            start_new_session=True,
            env=clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{store}"),
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, timeout=180, log=log)
        yield f"http://127.0.0.1:{port}/invocations"
    finally:
        stop(server)
    assert server.poll() is not None


def post(url: str, rows: list) -> list[dict]:
    """POST rows as curl does (dataframe_split); the reply parsed as strict JSON (NaN, Infinity refused)."""
    body = {"dataframe_split": {"columns": ["image"], "data": [[row] for row in rows]}}
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read(), parse_constant=_refuse_constant)["predictions"]


def _refuse_constant(name: str):
    raise ValueError(f"not JSON: {name}")


@pytest.mark.slow
def test_mlflow_models_serve_answers_strict_json_with_null_for_unreadable_rows(pipeline, tmp_path):
    cat = jpeg_bytes("cat", 721)
    dog = jpeg_bytes("dog", 720)
    with served(pipeline.root / "mlflow.db", tmp_path / "serve.log") as url:
        predictions = post(url, [b64(dog), b64(cat[: len(cat) // 2]), "%%%%"])
    assert [p["label"] for p in predictions] == ["dog", None, None], predictions
    assert predictions[0]["p_dog"] > 0.5 and predictions[0]["error"] is None
    # the server ran the variant auto picks on this CPU, and says so
    ran = auto_precision(pipeline.paths.exported / "model.onnx")
    assert f"catdog: the registered model runs {ran} (CATDOG_PRECISION=auto)" in (tmp_path / "serve.log").read_text()
    exported = ExportedModel.load(pipeline.paths.exported / "model.onnx", ran)
    assert predictions[0]["p_dog"] == pytest.approx(float(exported.probabilities(exported.preprocess(dog)[None])[0, 1]))
    assert predictions[1]["error"].startswith("corrupt") and predictions[2]["error"].startswith("not_base64")
    assert predictions[1]["p_cat"] is None and predictions[2]["p_dog"] is None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def auto_precision(model_file: Path) -> str:
    """What ``auto`` runs on this CPU: the first of its order that export shipped (fp32 at the latest)."""
    shipped = shipped_variants(model_file)
    return next(p for p in auto_order() if p in shipped or p == "fp32")


# --- a 3-class model: the class names come from the model ----------------------------------------

COLUMNS = ["label", "p_Golden Retriever", "p_Maine Coon", "p_chat tigré", "error"]


@pytest.fixture(scope="module")
def three(tmp_path_factory, mlflow_template, onnx_cache):
    return export_three_classes(tmp_path_factory.mktemp("three-serving"), mlflow_template, onnx_cache)


def three_class_rows() -> tuple[list, list[str]]:
    """Rows for the 3-class model and the cause each bad one must be refused with."""
    large = class_jpeg(0, 1, size=(400, 300))
    assert len(large) > THREE_CLASS_CAP
    rows = [b64(class_jpeg(i, 900 + i)) for i in range(3)]
    return [*rows, b64(large), "%%%%", b64(b"no image at all"), None], [
        "too_large",
        "not_base64",
        "not_an_image",
        "empty",
    ]


def test_three_class_signature_has_one_probability_column_per_class(three):
    folder = Path(
        mlflow.artifacts.download_artifacts(
            "models:/catdog@champion", tracking_uri=f"sqlite:///{three.root / 'mlflow.db'}"
        )
    )
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    outputs = json.loads(mlmodel["signature"]["outputs"])
    assert [c["name"] for c in outputs] == COLUMNS
    assert [c["type"] for c in outputs] == ["string", "double", "double", "double", "string"]


def test_three_class_pyfunc_answers_with_its_class_names(three):
    mlflow.set_tracking_uri(f"sqlite:///{three.root / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/catdog@champion")
    rows, causes = three_class_rows()
    result = model.predict(pd.DataFrame({"image": rows}))
    assert list(result.columns) == COLUMNS
    good = result.iloc[:3]
    assert set(good.label) <= set(THREE_CLASSES) and good.error.isna().all()
    assert good[COLUMNS[1:4]].astype(float).sum(axis=1).tolist() == pytest.approx([1.0] * 3)
    assert [error.split(":")[0] for error in result.error[3:]] == causes
    size = len(base64.b64decode(rows[3]))
    assert result.error[3] == f"too_large: {size} bytes > {THREE_CLASS_CAP} (data.max_image_bytes)"
    assert all(result.loc[i, column] is None for i in range(3, 7) for column in COLUMNS[:4])


@pytest.mark.slow
def test_mlflow_models_serve_of_a_three_class_model_answers_strict_json(three, tmp_path):
    rows, causes = three_class_rows()
    with served(three.root / "mlflow.db", tmp_path / "serve.log") as url:
        predictions = post(url, rows)
    assert [list(p) for p in predictions] == [COLUMNS] * len(rows)  # "p_Golden Retriever", "p_chat tigré": as named
    for prediction in predictions[:3]:
        assert prediction["label"] in THREE_CLASSES and prediction["error"] is None
        assert sum(prediction[c] for c in COLUMNS[1:4]) == pytest.approx(1.0)
    assert [p["error"].split(":")[0] for p in predictions[3:]] == causes
    assert all(p[c] is None for p in predictions[3:] for c in COLUMNS[:4])


def test_predict_cli_top_k_on_three_classes(three, tmp_path):
    image = tmp_path / "golden.jpg"
    image.write_bytes(class_jpeg(0, 950))
    model = str(three.paths.exported / "model.onnx")
    run = [str(CATDOG_BIN), "predict", str(image), "--model", model]
    proc = subprocess.run([*run, "--top-k", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (result,) = [json.loads(line, parse_constant=_refuse_constant) for line in proc.stdout.splitlines()]
    ranked = [c["label"] for c in result["top_k"]]
    assert len(ranked) == 2 and set(ranked) <= set(THREE_CLASSES) and ranked[0] == result["label"]
    assert result["top_k"][0]["probability"] >= result["top_k"][1]["probability"]
    table = subprocess.run([*run, "--top-k", "9", "--format", "table"], capture_output=True, text=True, timeout=120)
    header, row = table.stdout.splitlines()
    assert header.index("confidence") == len("Golden Retriever") + 1  # as wide as the longest class name
    assert all(name in row for name in THREE_CLASSES) and row.endswith(f"  {image}")  # 9 > 3: all three
    assert header.index("path") == row.index(str(image))
