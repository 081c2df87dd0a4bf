"""MLflow's side of batch scoring on Spark: the model fetched once on the driver, and the
registered pyfunc as a Spark UDF (``mlflow.pyfunc.spark_udf``) for ``catdog.serving.spark``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mlflow

from catdog.core.errors import CatdogError
from catdog.tracking.registry import download_registered_model
from catdog.tracking.store import quiet_mlflow


def download_model(uri: str, project_root: Path) -> Path:
    """The local folder of an MLflow model: a registry or run URI (``models:/catdog@champion``,
    ``runs:/...``) from the project's store (or ``MLFLOW_TRACKING_URI``), else any artifact URI
    MLflow reads (a local folder, ``s3://...``)."""
    if uri.startswith(("models:/", "runs:/")):
        return download_registered_model(uri, project_root)
    quiet_mlflow()
    try:
        return Path(mlflow.artifacts.download_artifacts(uri))
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        raise CatdogError(f"cannot load the model {uri}: {getattr(exc, 'message', exc)}") from None


def model_udf(spark, model_folder: Path):
    """The pyfunc in ``model_folder`` as a Spark UDF of MLflow's: its result columns are the model's
    output signature (``label``, ``p_<class>``..., ``error``); it runs in the executors' Python
    environment (``env_manager="local"``), which must hold the model's requirements."""
    import mlflow.pyfunc

    quiet_mlflow()
    pyfunc_logger = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_logger.level
    if os.environ.get("CATDOG_DEBUG") != "1":  # its warning that "local" does not rebuild the model's
        pyfunc_logger.setLevel(logging.ERROR)  # environment: docs/operations.md states the requirement
    try:
        return mlflow.pyfunc.spark_udf(spark, str(model_folder), env_manager="local")
    finally:
        pyfunc_logger.setLevel(level)
