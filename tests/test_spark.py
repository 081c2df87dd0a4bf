"""Batch scoring on a real Spark (local[2]) with the registered model: ``catdog spark-predict`` and
``catdog.serving.spark`` on a few hundred real JPEGs of the repository's sample, broken files among
them, checked file for file against ``catdog predict``. Needs the ``spark`` extra and Java 17."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from catdog import cli

from conftest import CATDOG_BIN, REPO_ROOT, client_for
from dvc_project import clean_env

pytest.importorskip("pyspark", reason="needs the spark extra: pip install '.[spark]'")
if not shutil.which("java") and not os.environ.get("JAVA_HOME"):
    pytest.skip("needs Java 17 (Debian: apt-get install openjdk-17-jre-headless)", allow_module_level=True)

pytestmark = pytest.mark.slow

SAMPLE = REPO_ROOT / "data" / "sample" / "dogs-vs-cats-sample.zip"
IMAGES = 300  # real JPEGs of the sample, in class subfolders
CAP = 12_000  # the model's data.max_image_bytes, lowered: the sample's largest JPEGs (up to 16 KB) are over it
BROKEN = {
    "broken/truncated.jpg": "corrupt",
    "broken/empty photo+1%.jpg": "empty",  # Spark's sources skip empty files: found from the listing
    "broken/notes.JPG": "not_an_image",
    "broken/EMPTY.PNG": "empty",
}


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    scratch = tmp_path_factory.mktemp("spark")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(scratch)  # whatever the JVM writes relative to its cwd stays out of the repository
        session = (
            SparkSession.builder.master("local[2]")
            .config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.ui.enabled", "false")
            .config("spark.driver.memory", "512m")
            .config("spark.local.dir", str(scratch))
            .config("spark.sql.warehouse.dir", str(scratch / "warehouse"))
            .getOrCreate()
        )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
    gateway = SparkContext._gateway  # the JVM would live on for the rest of the test session: end it
    gateway.shutdown()
    gateway.proc.stdin.close()  # PySpark's JVM exits when its stdin closes
    gateway.proc.wait(60)
    SparkContext._gateway = SparkContext._jvm = None


@pytest.fixture(scope="module")
def model(pipeline, tmp_path_factory) -> Path:
    """The pipeline's champion, downloaded from its sqlite store, with its byte cap lowered to CAP."""
    import mlflow

    folder = tmp_path_factory.mktemp("champion") / "model"
    version = client_for(pipeline.root).get_model_version_by_alias("catdog", "champion")
    store = f"sqlite:///{pipeline.root / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)  # the process-wide URI earlier tests may have pointed elsewhere (as test_serving)
    mlflow.artifacts.download_artifacts(version.source, dst_path=str(folder), tracking_uri=store, registry_uri=store)
    preprocess = folder / "artifacts" / "preprocess.json"
    preprocess.write_text(json.dumps({**json.loads(preprocess.read_text()), "max_image_bytes": CAP}))
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """IMAGES real JPEGs in cats/ and dogs/ (some over CAP), the BROKEN files and a text file."""
    root = tmp_path_factory.mktemp("photos")
    with zipfile.ZipFile(SAMPLE) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".jpg"))[:IMAGES]
        for name in names:
            label = Path(name).name.split(".")[0]
            target = root / f"{label}s" / Path(name).name
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(archive.read(name))
        jpeg = archive.read(names[0])
    (root / "broken").mkdir()
    (root / "broken/truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "broken/empty photo+1%.jpg").write_bytes(b"")
    (root / "broken/notes.JPG").write_text("not an image")
    (root / "broken/EMPTY.PNG").write_bytes(b"")
    (root / "broken/readme.txt").write_text("not an image file name: neither tool reads it")
    return root


def predict_cli(images: Path, model: Path, capsys) -> dict[str, dict]:
    """``catdog predict``'s answer for each file, by absolute path."""
    capsys.readouterr()
    assert cli.main(["predict", str(images), "--model", str(model / "artifacts" / "model.onnx")]) == 0
    return {row["path"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}


def local_path(spark_path: str) -> str:
    assert spark_path.startswith("file:/"), spark_path
    return spark_path.removeprefix("file:")


def test_spark_predict_labels_every_file_as_catdog_predict_does(spark, model, images, tmp_path, capsys):
    output = tmp_path / "scores.parquet"
    (tmp_path / ".scores.parquet.partial" / "_temporary").mkdir(parents=True)  # as a killed run leaves it
    assert cli.main(["spark-predict", str(images), str(output), "--model", str(model)]) == 0
    assert (output / "_SUCCESS").is_file() and not (tmp_path / ".scores.parquet.partial").exists()
    assert capsys.readouterr().out.startswith(f"catdog: {IMAGES + len(BROKEN)} files, ")
    table = pq.read_table(output)
    assert table.schema.names == ["path", "label", "p_cat", "p_dog", "error"]
    assert [str(t) for t in table.schema.types] == ["string", "string", "double", "double", "string"]
    rows = {local_path(row["path"]): row for row in table.to_pylist()}

    expected = predict_cli(images, model, capsys)
    assert len(expected) == IMAGES + len(BROKEN)  # readme.txt: not an image file name, for either
    assert rows.keys() == expected.keys()
    for path, row in rows.items():
        want = expected[path]
        assert row["label"] == want.get("label") and row["error"] == want.get("error"), (path, row, want)
        if row["error"] is None:
            assert max(row["p_cat"], row["p_dog"]) == pytest.approx(want["confidence"], abs=2e-6), path
        else:  # nothing but the error: no NaN, no "None"
            assert row["p_cat"] is None and row["p_dog"] is None and row["label"] is None, row

    errors = {Path(p).relative_to(images).as_posix(): row["error"] for p, row in rows.items() if row["error"]}
    assert {name: errors[name].split(":")[0] for name in BROKEN} == BROKEN
    too_large = {name: error for name, error in errors.items() if name not in BROKEN}
    assert too_large and all(
        e.startswith("too_large") and e.endswith(f"> {CAP} (data.max_image_bytes)") for e in too_large.values()
    )
    assert len(too_large) < IMAGES / 2 and {row["label"] for row in rows.values()} == {"cat", "dog", None}


def test_classify_adds_the_models_columns_to_a_dataframe_of_bytes(spark, model, images):
    from catdog.serving.spark import BATCH_CONF, classify

    cat = next((images / "cats").iterdir()).read_bytes()
    frame = spark.createDataFrame([("a", cat), ("b", cat[:1000]), ("c", None)], "name string, content binary")
    rows = classify(frame, str(model), batch_size=2).collect()
    assert rows[0].__fields__ == ["name", "content", "label", "p_cat", "p_dog", "error"]  # from the model
    assert (
        rows[0].label in ("cat", "dog") and rows[0].error is None and rows[0].p_cat + rows[0].p_dog == pytest.approx(1)
    )
    assert rows[1].error.startswith("corrupt") and rows[2].error.startswith("empty")
    assert rows[1].label is rows[1].p_cat is rows[2].label is rows[2].p_dog is None
    assert spark.conf.get(BATCH_CONF) == "2"  # what one executor's Python holds at a time


def test_a_source_without_images_is_one_line_exit_2(spark, model, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no image here")
    for source, says in ((tmp_path / "notes", "no images in"), (tmp_path / "missing", "cannot read")):
        assert cli.main(["spark-predict", str(source), str(tmp_path / "out"), "--model", str(model)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"catdog: error: {says} {source}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_killed_job_leaves_no_parquet_at_output(model, images, tmp_path):
    output, partial = tmp_path / "scores.parquet", tmp_path / ".scores.parquet.partial"
    args = [str(CATDOG_BIN), "spark-predict", str(images), str(output), "--model", str(model), "--master", "local[1]"]
    log = tmp_path / "spark-predict.log"
    with log.open("w") as handle:
        # its driver and web UI on loopback; its scratch files, which a killed job leaves, in tmp_path
        scratch = {"SPARK_LOCAL_DIRS": str(tmp_path), "TMPDIR": str(tmp_path)}
        env = clean_env(SPARK_LOCAL_IP="127.0.0.1", SPARK_SUBMIT_OPTS=f"-Djava.io.tmpdir={tmp_path}", **scratch)
        job = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not partial.exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.poll() is None and partial.exists(), log.read_text()[-3000:]  # killed while writing
        os.killpg(job.pid, signal.SIGKILL)  # the driver, its JVM and the Python workers
        job.wait(30)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert not output.exists()  # the partial output stays beside it; the next run removes it (test above)
