"""Where the runs go: the tracking URI, the server's health, the sqlite store's schema and lock,
and MLflow's own output kept quiet (its INFO lines and progress bars show with CATDOG_DEBUG=1)."""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no store lock
    fcntl = None

import mlflow
from mlflow.tracking import MlflowClient

from catdog.core.errors import CatdogError

ARTIFACTS_DIR = "mlruns"  # beside mlflow.db, as MLflow itself does
DB_FILE = "mlflow.db"


def store_root(project_root: Path) -> Path:
    """The repository whose store we log to.

    ``dvc exp run --queue`` executes in ``.dvc/tmp/exps/...`` and exports DVC_ROOT pointing at
    the real repository; a path relative to the temp copy would log into a store that is
    thrown away.
    """
    return Path(os.environ.get("DVC_ROOT") or project_root).resolve()


# mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; the defaults we set must not pass for the user's.
_defaults_in_use: set[str] = set()


def tracking_uri(project_root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when the user set it, else the project's sqlite store."""
    user = os.environ.get("MLFLOW_TRACKING_URI")
    if user and user not in _defaults_in_use:
        return user
    return default_tracking_uri(project_root)


def default_tracking_uri(project_root: Path) -> str:
    return f"sqlite:///{store_root(project_root) / DB_FILE}"


def connect(project_root: Path) -> MlflowClient:
    """The client of the project's store, made the active one: the server checked, the schema there."""
    quiet_mlflow()
    uri = tracking_uri(project_root)
    if uri == default_tracking_uri(project_root):
        _defaults_in_use.add(uri)
    mlflow.set_tracking_uri(uri)
    check_server(project_root)
    _prepare_sqlite_store(uri)
    return MlflowClient()


def quiet_mlflow() -> None:
    """A stage's output is its own: MLflow's INFO lines (store creation, system metrics monitor),
    alembic's and the artifact download bars only with CATDOG_DEBUG=1; warnings and errors show,
    but for those repeating a tracking-server outage. An ``MLFLOW_LOGGING_LEVEL`` the user exported wins."""
    if os.environ.get("CATDOG_DEBUG") == "1":
        return
    for name in _OUTAGE_REPEATERS:
        if not any(isinstance(f, _ServerDownFilter) for f in logging.getLogger(name).filters):
            logging.getLogger(name).addFilter(_ServerDownFilter())
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not os.environ.get("MLFLOW_LOGGING_LEVEL"):
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)


# MLflow threads that log each failed call to a tracking server that is down: the system-metrics
# monitor (at any moment, even after the stage's last line) and the queue of asynchronous writes
# (whose batches the stage keeps in its outbox).
_OUTAGE_REPEATERS = ("mlflow.system_metrics.system_metrics_monitor", "mlflow.utils.async_logging.async_logging_queue")


class _ServerDownFilter(logging.Filter):
    """Drops those complaints while the server is down: the stage's own "lost the MLflow tracking
    server" and "still unreachable" lines say it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING or lost_server(mlflow.get_tracking_uri()) is None


SERVER_CHECK_SECONDS = 10
# MLflow's own defaults retry a dead server for minutes (7 retries, backoff factor 2, 120 s timeout);
# these bound every request to well under a minute. A value the user exported wins.
_HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
_reachable_servers: set[str] = set()


def check_server(project_root: Path) -> None:
    """Fail fast, in one line, when an http(s) tracking server does not answer its /health
    (stages call it first thing, before any slow work)."""
    uri = tracking_uri(project_root)
    if not uri.startswith(("http://", "https://")) or uri in _reachable_servers:
        return
    for name, value in _HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)
    problem = server_problem(uri)
    if problem:
        raise CatdogError(
            f"MLflow tracking server {uri} is unreachable ({problem}): "
            f"start it, or unset MLFLOW_TRACKING_URI to log to the project's {DB_FILE}"
        )
    _reachable_servers.add(uri)


def lost_server(uri: str) -> str | None:
    """Why the tracking server at ``uri`` does not answer, or None (also for a local store)."""
    return server_problem(uri) if uri.startswith(("http://", "https://")) else None


def server_problem(uri: str, timeout: float = SERVER_CHECK_SECONDS) -> str | None:
    """Why an http(s) server does not answer its /health within ``timeout`` seconds, or None."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered: whatever /health says, the API calls will tell
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


_prepared_stores: set[str] = set()


def _prepare_sqlite_store(uri: str) -> None:
    """Let MLflow create/migrate a sqlite store's schema under an exclusive file lock, once per process.

    MLflow builds a new sqlite store's schema on first use, unguarded: the stages of parallel
    experiments (``dvc queue start -j 2``) that meet a fresh ``mlflow.db`` together fail with
    "duplicate column name" or alembic's "expected to match one row". Once the schema exists,
    concurrent writers are fine: MLflow sets ``PRAGMA busy_timeout = 20000`` on every session.
    """
    if uri in _prepared_stores:
        return
    with sqlite_lock(uri):
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # tracking tables and migrations
        client.search_registered_models(max_results=1)  # model registry tables
    _prepared_stores.add(uri)


@contextlib.contextmanager
def sqlite_lock(uri: str) -> Iterator[bool]:
    """An exclusive lock on a file beside a sqlite store (yields True), or nothing (False)."""
    db = Path(uri.removeprefix("sqlite:///").split("?")[0])
    if fcntl is None or not uri.startswith("sqlite:///") or db.name in ("", ":memory:"):
        yield False
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield True


def experiment_id(client: MlflowClient, name: str, project_root: Path) -> str:
    """The experiment ``name``, created (artifacts beside the project's store) if it is not there."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if client.tracking_uri == default_tracking_uri(project_root):  # a server decides for itself
        location = (store_root(project_root) / ARTIFACTS_DIR).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created by a parallel run meanwhile
        return client.get_experiment_by_name(name).experiment_id
