"""Concurrent champion promotions: several processes released at the same instant by a barrier,
round after round, on a real sqlite store and on a real ``mlflow server``."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from catdog import tracking

from dvc_project import free_port, start_mlflow, stop

MODEL = "catdog-race"
TEST_SET = "the-same-test-images"
CONTENDERS, ROUNDS = 5, 3


def _promote(uri: str, version: str, accuracy: float, barrier, results) -> None:
    client = MlflowClient(uri)
    barrier.wait()
    results.put((version, tracking.promote_champion(client, MODEL, version, tracking.Score(accuracy, TEST_SET))))


def _race(uri: str, versions: dict[str, float]) -> dict[str, bool]:
    context = multiprocessing.get_context("fork")  # mlflow already imported: the workers start at once
    barrier, results = context.Barrier(len(versions)), context.Queue()
    workers = [
        context.Process(target=_promote, args=(uri, version, accuracy, barrier, results))
        for version, accuracy in versions.items()
    ]
    for worker in workers:
        worker.start()
    outcome = dict(results.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    return outcome


def _versions(client: MlflowClient, run_id: str, accuracies) -> dict[str, float]:
    return {
        client.create_model_version(
            MODEL, f"runs:/{run_id}/model", run_id, tags=tracking.Score(float(a), TEST_SET).tags()
        ).version: float(a)
        for a in accuracies
    }


@pytest.fixture(params=["sqlite", pytest.param("server", marks=pytest.mark.slow)])
def tracking_uri(request, mlflow_store, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{mlflow_store}"
        return
    port = free_port()
    server = start_mlflow(
        "server",
        ["--backend-store-uri", f"sqlite:///{mlflow_store}", "--default-artifact-root", str(tmp_path / "artifacts")],
        port,
        tmp_path / "server.log",
        tmp_path,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)


def test_concurrent_promotions_always_leave_the_best_version_champion(tracking_uri):
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("race")).info.run_id
    client.create_registered_model(MODEL)
    rng = np.random.default_rng(0)
    best_so_far = -1.0
    for _ in range(ROUNDS):
        versions = _versions(client, run_id, rng.permutation(np.linspace(0.5, 0.99, CONTENDERS)) * rng.uniform(0.9, 1))
        outcome = _race(tracking_uri, versions)
        best_version = max(versions, key=versions.get)
        champion = client.get_model_version_by_alias(MODEL, "champion")
        if versions[best_version] > best_so_far:
            assert champion.version == best_version, (versions, outcome)
            assert outcome[best_version]
            best_so_far = versions[best_version]
        assert float(champion.tags["test_accuracy"]) == best_so_far
