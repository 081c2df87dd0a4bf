"""Every MLflow call of the project, and nothing else: DVC never has to know about MLflow. The
package owns the store and server (``store``: tracking URI, health check, sqlite lock, MLflow's
output kept quiet), the runs (``runs``: one MLflow run per pipeline run, found by the checkpoint's
md5 and copied when needed, ``copies``; a stage's run and what it logs, ``run``; its writes, held
in an ``outbox`` while the server is lost, ``writes``; the lineage tags, ``lineage``), the registry
(``registry``: the logged models, aliases, champion promotion) and the dataset record
(``datasets``). It may import mlflow and catdog's integrity, lifecycle, params, paths and errors;
only it and the registered model's own module (``catdog.serving.pyfunc``) import mlflow. The rest of the
code calls the names below; ``catdog.serving.spark`` imports ``spark`` itself (the model fetched for
Spark, ``mlflow.pyfunc.spark_udf``), so the stages do not depend on it.
"""

from catdog.tracking.datasets import prepared_dataset, prepared_digest
from catdog.tracking.lineage import CHECKPOINT_TAG, CLASSES_PARAM, lineage_tags, params_hash, run_name
from catdog.tracking.registry import Registration, Score, download_registered_model, promote_champion
from catdog.tracking.run import Run
from catdog.tracking.runs import reopen_train_run, run_exists, send_held_back, stage_run, start_run
from catdog.tracking.store import DB_FILE, check_server, default_tracking_uri, store_root, tracking_uri

__all__ = [
    "CHECKPOINT_TAG",
    "CLASSES_PARAM",
    "DB_FILE",
    "Registration",
    "Run",
    "Score",
    "check_server",
    "default_tracking_uri",
    "download_registered_model",
    "lineage_tags",
    "params_hash",
    "prepared_dataset",
    "prepared_digest",
    "promote_champion",
    "reopen_train_run",
    "run_exists",
    "run_name",
    "send_held_back",
    "stage_run",
    "start_run",
    "store_root",
    "tracking_uri",
]
