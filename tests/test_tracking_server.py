"""A shared tracking server: ``mlflow server`` on a PostgreSQL backend store with served artifacts,
and the real pipeline (``dvc repro``) logging to it through ``MLFLOW_TRACKING_URI=http://...``.

A throwaway PostgreSQL cluster (Debian package ``postgresql``) is initialised in a temp dir and
listens on 127.0.0.1 only, on a free port; it runs as the ``postgres`` user when the tests run as
root. The server is bound to 127.0.0.1. Both are stopped by the fixtures. Everything the test
checks, it reads through the server's REST API, except the row counts it reads from PostgreSQL.
"""

from __future__ import annotations

import filecmp
import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

import pytest

import dvc_project as dp
from dvc_project import STAGES, TINY_PARAMS, stage_runs

pytestmark = pytest.mark.slow


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="module")
def postgres():
    """``postgresql+psycopg2://postgres:<password>@127.0.0.1:<port>/mlflow`` on a throwaway cluster."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries are missing: apt-get install postgresql (.ci/run does)")
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 is missing: pip install -e '.[test]'")
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        as_postgres = ["runuser", "-u", "postgres", "--"]
    # not under pytest's tmp dir: that one is private to root (0700), the postgres user cannot enter it
    base = Path(tempfile.mkdtemp(prefix="catdog-pg-"))
    password = secrets.token_hex(12)
    (base / "pwfile").write_text(password + "\n")
    if as_postgres:
        shutil.chown(base, "postgres")
        shutil.chown(base / "pwfile", "postgres")
    port = dp.free_port()
    data = base / "data"

    def pg(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([*as_postgres, *args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            log = base / "server.log"
            pytest.fail(f"{dp.describe(proc)}\n{log.read_text() if log.exists() else ''}", pytrace=False)
        return proc

    try:
        pg(
            initdb,
            "-D",
            str(data),
            "-U",
            "postgres",
            "--pwfile",
            str(base / "pwfile"),
            "-E",
            "UTF8",
            "--auth-local=scram-sha-256",
            "--auth-host=scram-sha-256",
            "--no-sync",
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off"
        pg(pg_ctl, "-D", str(data), "-l", str(base / "server.log"), "-o", options, "-w", "start")
        try:
            connection = psycopg2.connect(
                host="127.0.0.1", port=port, user="postgres", password=password, dbname="postgres"
            )
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("CREATE DATABASE mlflow")
            connection.close()
            # +psycopg2: SQLAlchemy 2.1's default PostgreSQL driver is psycopg 3, we install psycopg2-binary
            yield f"postgresql+psycopg2://postgres:{password}@127.0.0.1:{port}/mlflow"
        finally:
            pg(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """``mlflow server --backend-store-uri postgresql://... --serve-artifacts --artifacts-destination DIR``."""
    base = tmp_path_factory.mktemp("tracking-server")
    artifacts = base / "artifacts"
    port = dp.free_port()
    log = base / "mlflow-server.log"
    proc = dp.start_mlflow(
        "server",
        ["--backend-store-uri", postgres, "--serve-artifacts", "--artifacts-destination", str(artifacts)],
        port,
        log,
        cwd=base,
        timeout=180,
    )
    try:
        yield f"http://127.0.0.1:{port}", artifacts, log
    finally:
        dp.stop(proc)


@pytest.fixture(scope="module")
def pipeline(server, tmp_path_factory):
    """The tiny pipeline reproduced with MLFLOW_TRACKING_URI pointing at the server."""
    uri, _, _ = server
    proj = dp.copy_project(tmp_path_factory.mktemp("server-pipeline") / "project", TINY_PARAMS)
    proj.env["MLFLOW_TRACKING_URI"] = uri
    proj.repros.append(proj.dvc("repro").stdout)
    return proj


def test_pipeline_logs_run_metrics_and_model_to_the_server(server, pipeline, postgres, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, artifacts, log = server
    proj = pipeline
    assert stage_runs(proj.repros[0]) == set(STAGES), proj.repros[0]
    assert not (proj.root / "mlflow.db").exists(), "with MLFLOW_TRACKING_URI set, nothing goes to the local store"

    client = MlflowClient(tracking_uri=uri)  # the REST API, nothing local
    experiment = client.get_experiment_by_name("catdog")
    assert experiment is not None
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert {run.data.tags[f"catdog.results.{stage}"] for stage in ("train", "evaluate", "export")} == {"logged"}

    # params and metrics
    assert run.data.params["train.lr"] == str(TINY_PARAMS["train"]["lr"])
    history = client.get_metric_history(run_id, "val/loss")
    assert sorted(m.step for m in history) == list(range(1, TINY_PARAMS["train"]["epochs"] + 1))
    evaluate = proj.json("reports/evaluate/metrics.json")
    assert run.data.metrics["test/accuracy"] == pytest.approx(evaluate["accuracy"])
    assert "export/onnx_max_abs_diff" in run.data.metrics

    # artifacts, uploaded through the server into --artifacts-destination, and downloaded back
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    card = Path(client.download_artifacts(run_id, "export/MODEL_CARD.md", str(tmp_path)))
    assert filecmp.cmp(card, proj.root / "models" / "export" / "MODEL_CARD.md", shallow=False)
    assert list(artifacts.rglob("model.onnx")), f"nothing under {artifacts}"  # the pyfunc's ONNX model

    # the registered pyfunc loads from the server and classifies a JPEG
    models = {m.name for m in client.search_logged_models(experiment_ids=[experiment.experiment_id])}
    assert "classifier" in models, sorted(models)
    import mlflow
    import pandas as pd

    with zipfile.ZipFile(proj.root / "data" / "tiny.zip") as archive:
        jpeg = archive.read(next(name for name in archive.namelist() if name.endswith(".jpg")))
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # models:/ resolves through the tracking server
    try:
        answer = mlflow.pyfunc.load_model("models:/catdog@champion").predict(pd.DataFrame({"image": [jpeg]}))
    finally:
        mlflow.set_tracking_uri(previous)
    assert answer["label"][0] in {"cat", "dog"} and not isinstance(answer["error"][0], str)

    # the model registry lives on the server too
    version = client.get_model_version_by_alias("catdog", "champion")
    assert version.run_id == run_id

    # and it all is in PostgreSQL
    import psycopg2

    with psycopg2.connect(postgres.replace("+psycopg2", "")) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM runs")
        assert cursor.fetchone()[0] == 1
        cursor.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'val/loss'", (run_id,))
        assert cursor.fetchone()[0] == TINY_PARAMS["train"]["epochs"]
    assert "Traceback" not in log.read_text(), dp.tail(log.read_text())


def test_server_listens_on_loopback_only(server):
    uri, _, _ = server
    port = int(uri.rsplit(":", 1)[1])
    listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
    if listening.returncode != 0:
        pytest.skip("ss (iproute2) is not available")
    addresses = {line.split()[3].rsplit(":", 1)[0] for line in listening.stdout.splitlines() if line.strip()}
    assert addresses == {"127.0.0.1"}, listening.stdout
