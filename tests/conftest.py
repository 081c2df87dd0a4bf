"""Shared fixtures: synthetic images and datasets, small params, isolated paths and MLflow stores.

Everything is real: JPEG/PNG files written with PIL, sqlite MLflow stores in tmp dirs, real
torch models. Nothing of catdog is mocked.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from catdog.core.params import Params, parse_params
from catdog.core.paths import Paths
from catdog.core.reports import DECIMALS

# A figure read back from a DVC report file is the computed one rounded to DECIMALS.
ROUNDED = 0.5 * 10**-DECIMALS

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_PARAMS = REPO_ROOT / "params.yaml"
# the console script of the environment pytest runs in (make test: .venv)
CATDOG_BIN = next(
    (b for b in (Path(sys.executable).parent / "catdog", REPO_ROOT / ".venv" / "bin" / "catdog") if b.exists()),
    REPO_ROOT / ".venv" / "bin" / "catdog",
)

# Environment variables catdog reads; the developer's shell must not leak into the tests.
_CATDOG_ENV = (
    "MLFLOW_TRACKING_URI",
    "DVC_ROOT",
    "DVC_EXP_NAME",
    "DVC_EXP_BASELINE_REV",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_RUN_ID",
)

# Small but valid: what every test that runs a stage starts from.
SMALL_OVERRIDES = {
    "train.arch": "efficientnet_lite0",  # the smallest pretrained backbone: tests check mechanics
    "data.cache_size": 64,
    "data.min_per_class": 4,
    "data.workers": 1,  # in-process decode: no pool start-up cost
    "train.image_size": 64,
    "train.epochs": 2,
    "train.head": "gradient",  # the tests of the epoch loops; head auto (logistic, one fit) has its own
    "train.batch_size": 8,
    "train.workers": 0,
    "evaluate.batch_size": 16,
    "export.precision": [],  # quantising and compiling variants costs seconds: only where a test checks them
}

_COLOURS = {"cat": (200, 70, 50), "dog": (50, 80, 200)}  # reddish cats, bluish dogs


# --- pytest plumbing ---------------------------------------------------------------------------


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs CUDA (marked gpu)")


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory) -> Path:
    """One frozen-graph cache for the whole test session (catdog.models.onnx_runtime): graphs are reused
    across tests as across experiments, and never land in the developer's ~/.cache."""
    return tmp_path_factory.mktemp("catdog-cache")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path, onnx_cache):
    """No catdog/MLflow env from the developer's shell, and the cwd in tmp_path.

    MLflow resolves its default artifact root against the cwd, and ``mlflow.set_tracking_uri``
    exports MLFLOW_TRACKING_URI into os.environ: neither may leak into the repository or into
    the next test.
    """
    for name in _CATDOG_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CATDOG_CACHE", str(onnx_cache))
    monkeypatch.chdir(tmp_path)
    yield
    for name in _CATDOG_ENV:
        os.environ.pop(name, None)  # monkeypatch then restores whatever was there before


# --- synthetic images --------------------------------------------------------------------------


def synthetic_image(label: str, index: int, size: tuple[int, int] = (72, 60)) -> Image.Image:
    """A seeded noisy image whose colour tells the class: cats reddish, dogs bluish."""
    rng = np.random.default_rng([hash_label(label), index])
    width, height = size
    base = np.array(_COLOURS[label], dtype=np.float32)
    pixels = base + rng.normal(0, 20, size=(height, width, 3))
    # a darker blob somewhere, so images differ in structure too
    y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
    pixels[y : y + height // 3, x : x + width // 3] *= 0.75
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def hash_label(label: str) -> int:
    return sum(ord(c) * 31**i for i, c in enumerate(label))


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def jpeg_bytes(label: str, index: int, size: tuple[int, int] = (72, 60)) -> bytes:
    return encode(synthetic_image(label, index, size), "JPEG", quality=90)


@pytest.fixture
def make_jpeg():
    """``make_jpeg(label, index, size=(w, h)) -> bytes``: a class-distinguishable JPEG."""
    return jpeg_bytes


# --- datasets ----------------------------------------------------------------------------------


@dataclass
class Dataset:
    zip: Path  # Kaggle layout: train/cat.N.jpg, train/dog.N.jpg
    folder: Path  # the same files extracted
    n_per_class: int
    files: dict[str, bytes]  # member name -> bytes (good images only)


def build_dataset(root: Path, n_per_class: int = 12, extra: dict[str, bytes] | None = None) -> Dataset:
    """Writes the zip and the extracted folder; ``extra`` adds more members (bad files, ...)."""
    files = {}
    for label in ("cat", "dog"):
        for index in range(n_per_class):
            # vary the aspect ratio a little: prepare squashes to a square
            size = (64 + (index % 3) * 8, 56 + (index % 2) * 8)
            files[f"train/{label}.{index}.jpg"] = jpeg_bytes(label, index, size)
    members = {**files, **(extra or {})}
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "train.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for name, data in members.items():
            handle.writestr(name, data)
    folder = root / "folder"
    for name, data in members.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return Dataset(archive, folder, n_per_class, files)


@pytest.fixture
def dataset(tmp_path) -> Dataset:
    """12 cats + 12 dogs as a Kaggle train.zip and the same images as a folder."""
    return build_dataset(tmp_path / "raw")


@pytest.fixture
def make_dataset(tmp_path):
    """``make_dataset(n_per_class=12, extra={name: bytes}, name="raw") -> Dataset``."""

    def make(n_per_class: int = 12, extra: dict[str, bytes] | None = None, name: str = "raw") -> Dataset:
        return build_dataset(tmp_path / name, n_per_class, extra)

    return make


# --- reading outputs ---------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_csv(path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def run_id(paths: Paths) -> str:
    """The pipeline's MLflow run: the most recent one tagged with its checkpoint's md5."""
    from catdog.data import integrity

    client = client_for(paths.root)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"tags.`catdog.checkpoint_md5` = '{integrity.file_md5(paths.checkpoint)}'",
        order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id


# --- params and paths --------------------------------------------------------------------------


def repo_params_raw() -> dict:
    return yaml.safe_load(REPO_PARAMS.read_text())


def build_params(overrides: dict[str, object] | None = None, **kwargs) -> Params:
    """The repo's params.yaml with SMALL_OVERRIDES and then ``overrides`` ({"train.lr": 0.01})."""
    raw = repo_params_raw()
    for key, value in {**SMALL_OVERRIDES, **(overrides or {}), **kwargs}.items():
        section, name = key.split(".")
        raw[section][name] = value
    return parse_params(raw, source="test")


@pytest.fixture
def make_params():
    """``make_params({"data.source": ..., "train.epochs": 1}) -> Params`` (small sizes, workers 0/1)."""
    return build_params


@pytest.fixture
def params(dataset) -> Params:
    """Small params reading the ``dataset`` zip."""
    return build_params({"data.source": str(dataset.zip)})


@pytest.fixture
def paths(tmp_path) -> Paths:
    return Paths.under(tmp_path)


# --- MLflow ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty, fully migrated sqlite store; copying it saves ~5 s of migrations per test."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow-template")
    db = folder / "mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


def seed_store(template: Path, root: Path) -> Path:
    """A real sqlite store at ``root/mlflow.db`` (where catdog puts it by default)."""
    root.mkdir(parents=True, exist_ok=True)
    db = root / "mlflow.db"
    shutil.copyfile(template, db)
    return db


def prepared_project(root: Path, template: Path, **defaults):
    """10 + 10 synthetic images prepared in ``root`` with an MLflow store; returns
    (paths, params) where ``params(**overrides)`` builds Params from ``defaults`` + overrides."""
    from catdog.pipeline import prepare

    data = build_dataset(root / "raw", n_per_class=10)
    seed_store(template, root)
    paths = Paths.under(root)

    def params(**overrides):
        return build_params(
            {"data.source": str(data.zip), "data.val_fraction": 0.2, "data.test_fraction": 0.2, **defaults, **overrides}
        )

    prepare.run(params(), paths)
    return paths, params


@pytest.fixture
def mlflow_store(mlflow_template, tmp_path) -> Path:
    """``tmp_path/mlflow.db``: the default store of ``Paths.under(tmp_path)``."""
    return seed_store(mlflow_template, tmp_path)


def client_for(root_or_db: Path):
    from mlflow.tracking import MlflowClient

    db = root_or_db if root_or_db.suffix == ".db" else root_or_db / "mlflow.db"
    return MlflowClient(tracking_uri=f"sqlite:///{db}")


@pytest.fixture
def mlflow_client():
    """``mlflow_client(root_or_db) -> MlflowClient`` on that sqlite store."""
    return client_for


# --- the whole pipeline, once ------------------------------------------------------------------


@dataclass
class PipelineRun:
    root: Path
    paths: Paths
    params: Params
    dataset: Dataset
    prepare: dict
    train: dict
    evaluate: dict
    export: dict


PIPELINE_OVERRIDES = {
    "data.val_fraction": 0.25,
    "data.test_fraction": 0.25,
    "train.mode": "features",
    "train.epochs": 3,
    "train.batch_size": 4,
    "train.lr": 0.02,
    "tracking.experiment_name": "catdog-test",
    "tracking.log_pytorch_model": True,  # the opt-in path; tests/test_pipeline.py runs the default
    "export.precision": ["int8", "bf16"],  # predict, serving and the registry tests see the variants
}


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, mlflow_template, onnx_cache) -> PipelineRun:
    """prepare -> train (features, 3 epochs, 64 px) -> evaluate -> export on 20 + 20 images.

    Shared by the train/export/predict tests: it is the expensive part of the suite.
    """
    from catdog.pipeline import evaluate, export, prepare, train

    root = tmp_path_factory.mktemp("pipeline")
    data = build_dataset(root / "raw", n_per_class=20)
    seed_store(mlflow_template, root)
    params = build_params({**PIPELINE_OVERRIDES, "data.source": str(data.zip)})
    paths = Paths.under(root)
    # export logs these as the run's lineage (the lock without entries: no stage ran under DVC here)
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
    shutil.copy(REPO_ROOT / "dvc.yaml", root / "dvc.yaml")
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    with pytest.MonkeyPatch.context() as patch:
        for name in _CATDOG_ENV:
            patch.delenv(name, raising=False)
        patch.setenv("CATDOG_CACHE", str(onnx_cache))
        patch.chdir(root)  # anything MLflow writes relative to the cwd stays in the tmp dir
        try:
            results = [stage.run(params, paths) for stage in (prepare, train, evaluate, export)]
        finally:
            for name in _CATDOG_ENV:
                os.environ.pop(name, None)
    return PipelineRun(root, paths, params, data, *results)
