"""The models of a run and the registry: the registered pyfunc, its aliases and the champion's promotion.

``candidate`` always moves to the newest version; ``champion`` only to a version whose test accuracy
beats the champion's on the same test images.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from catdog.core.errors import CatdogError
from catdog.tracking.store import DB_FILE, quiet_mlflow, sqlite_lock, tracking_uri

CLASSIFIER = "classifier"  # the registered pyfunc's name in its run


@dataclass(frozen=True)
class Score:
    """A model version's test accuracy and which test images gave it (``data.split_digest``):
    accuracies on other test images are not compared."""

    accuracy: float
    test_set: str

    def tags(self) -> dict[str, str]:
        return {"test_accuracy": str(self.accuracy), "test_set": self.test_set}


@dataclass(frozen=True)
class Registration:
    version: str
    promoted: bool  # the champion alias moved to this version
    incomparable_champion: str | None = None  # asked to promote: the champion, if scored on other test images


def log_classifier(model: dict, name: str | None, score: Score, promote: bool) -> Registration | None:
    """Log ``model`` (``mlflow.pyfunc.log_model`` arguments, from :func:`catdog.serving.pyfunc_model`)
    as the active run's ``classifier``. With ``name``, register it as a new version; ``candidate``
    always moves to it, ``champion`` only if ``promote`` and it beats the current champion."""
    import mlflow.pyfunc

    info = mlflow.pyfunc.log_model(name=CLASSIFIER, **model)
    if not name:
        return None
    client = MlflowClient()
    version = _register(client, name, info, score)
    client.set_registered_model_alias(name, "candidate", version)
    if not promote:
        return Registration(version, False)
    if promote_champion(client, name, version, score):
        return Registration(version, True)
    champion = _champion(client, name)
    elsewhere = champion is not None and not _same_test_set(champion, score)
    return Registration(version, False, str(champion.version) if elsewhere else None)


def _register(client: MlflowClient, name: str, info, score: Score) -> str:
    """A new version of ``name`` from the logged model, as ``mlflow.register_model`` makes it, but
    through the client, which prints nothing ("Successfully registered model ..." on stderr)."""
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    source = f"models:/{info.model_id}"  # the logged model, as MLflow's own registration names it
    version = client.create_model_version(name, source, info.run_id, tags=score.tags(), model_id=info.model_id).version
    # the logged model's link to its version, as MLflow sets it (the UI shows it on the model's page)
    client.set_logged_model_tags(
        info.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([{"name": name, "version": version}])}
    )
    return str(version)


def promote_champion(client: MlflowClient, name: str, version: str, score: Score) -> bool:
    """Move ``champion`` to ``version`` if its test accuracy beats the current champion's on the
    same test images (a champion scored on other images stays: the two are not comparable).

    Concurrent exports must not interleave the compare and the set (a worse version would win
    the last write): on a sqlite store the pair runs under the store's file lock; a server offers
    no lock, so there the alias is set, then checked again until it holds still (a better version
    set meanwhile wins, a worse one is overwritten)."""
    with sqlite_lock(client.tracking_uri) as locked:
        if locked:
            if not _beats_champion(client, name, score):
                return False
            client.set_registered_model_alias(name, "champion", version)
            return True
    return _set_until_it_holds(client, name, version, score)


def _set_until_it_holds(
    client: MlflowClient, name: str, version: str, score: Score, settle_seconds: float = 1.0, attempts: int = 20
) -> bool:
    """True once ``version`` is still champion a settle period after it was set: longer than any
    competitor's gap between reading the champion and setting it, so no stale set can follow."""
    for _ in range(attempts):
        champion = _champion(client, name)
        if champion is None or champion.version != version:
            if not _beats_champion(client, name, score):
                return False  # a better (or as good, or incomparable) version holds it
            with contextlib.suppress(mlflow.exceptions.MlflowException):  # two first sets can collide
                client.set_registered_model_alias(name, "champion", version)
        time.sleep(settle_seconds * random.uniform(0.5, 1.0))
        champion = _champion(client, name)
        if champion is not None and champion.version == version:
            return True
    return False


def _champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, "champion")
    except mlflow.exceptions.MlflowException:  # no champion yet
        return None


def _beats_champion(client: MlflowClient, name: str, score: Score) -> bool:
    champion = _champion(client, name)
    if champion is None:
        return True
    return _same_test_set(champion, score) and score.accuracy > float(champion.tags["test_accuracy"])


def _same_test_set(version, score: Score) -> bool:
    """Whether model ``version`` was scored on the test images of ``score``: else not comparable."""
    return version.tags.get("test_set") == score.test_set


def download_registered_model(uri: str, project_root: Path) -> Path:
    """The local folder of a registry model (``models:/<name>@<alias>``) from the project's store."""
    if not os.environ.get("MLFLOW_TRACKING_URI") and not (project_root / DB_FILE).is_file():
        raise CatdogError(
            f"no MLflow store for {uri}: run from the project root (where {DB_FILE} is) or set MLFLOW_TRACKING_URI"
        )
    quiet_mlflow()  # keep stderr to our one line
    mlflow.set_tracking_uri(tracking_uri(project_root))
    try:
        return Path(mlflow.artifacts.download_artifacts(uri))
    except mlflow.exceptions.MlflowException as exc:
        raise CatdogError(f"cannot load {uri} from {mlflow.get_tracking_uri()}: {exc.message}") from None


def log_pytorch_model(model, example_input) -> None:
    """The model with signature and input example, loadable with ``mlflow.pytorch.load_model``
    (MLflow's default pt2 format: a torch.export program, no pickle; call it, no ``.eval()``).
    pt2 needs the example, which MLflow stores as JSON (megabytes at 224 px): only logged when
    ``tracking.log_pytorch_model`` asks."""
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    model = model.cpu().eval()
    with torch.inference_mode():
        example_output = model(torch.from_numpy(example_input)).numpy()
    mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(example_input, example_output.astype(np.float32)),
        input_example=example_input,
        # Written out rather than inferred: inference re-imports the model in a subprocess.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "efficientnet-lite-pytorch==0.1.0"],
    )
