"""A run's writes: to the store, or, while an http(s) tracking server is unreachable, to the run's
:class:`~catdog.tracking.outbox.Outbox`, replayed in order once the server is back."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from catdog.core.errors import CatdogError
from catdog.tracking import outbox
from catdog.tracking.copies import record_checkpoint
from catdog.tracking.outbox import Outbox
from catdog.tracking.store import lost_server, server_problem


class Writes:
    """The writes of one run. The stage goes on while the server is lost; its writes are sent when
    the server is back (by this stage, the next one, or ``catdog sync``)."""

    def __init__(self, run_id: str, store: Path):
        self.run_id = run_id
        self.outbox = Outbox(store, run_id, mlflow.get_tracking_uri())
        self.holding = False  # the server is lost: writes go to the outbox
        self._pending = PendingMetrics()

    def write(self, op: str, payload: dict) -> None:
        if not self.holding:
            try:
                apply(MlflowClient(), self.run_id, op, payload)
                return
            except Exception as exc:
                self._hold(exc)
        self.outbox.add(op, payload)

    def write_metrics_async(self, values: dict[str, float], step: int) -> None:
        payload = metrics_payload(values, step)
        if self.holding:
            self.outbox.add("metrics", payload)
        else:
            self._pending.send(self.run_id, payload)

    def confirm(self) -> None:
        """Waits for the asynchronous writes so far (what the server did not take goes to the
        outbox); while holding, sends the outbox if the server is back."""
        for payload, exc in self._pending.refused():
            self._hold(exc)
            self.outbox.add("metrics", payload)
        if self.holding and server_problem(self.outbox.uri, timeout=2) is None:
            self.holding = not send(MlflowClient(), self.outbox)

    def finish(self, stage: str) -> None:
        """At the end of the stage: a lost server gets ``CATDOG_TRACKING_GRACE_SECONDS`` (default
        30) to come back; after that the stage ends anyway, with its writes kept in the outbox."""
        self.confirm()
        deadline = time.monotonic() + float(os.environ.get("CATDOG_TRACKING_GRACE_SECONDS", "30"))
        while self.holding and time.monotonic() < deadline:
            time.sleep(1)
            self.confirm()
        if self.holding:
            self.write("end", {"status": "FINISHED"})
            print(
                f"{stage}: warning: the MLflow tracking server {self.outbox.uri} is still unreachable: "
                f"{self.outbox.summary()} of run {self.run_id} wait in {self.outbox.journal}; "
                "the next stage that reaches the server sends them, or run `catdog sync`",
                file=sys.stderr,
                flush=True,
            )

    def _hold(self, exc: Exception) -> None:
        """Re-raises ``exc`` unless the tracking server is unreachable; then holds the writes."""
        uri = mlflow.get_tracking_uri()
        problem = lost_server(uri)
        if problem is None:
            raise exc
        if not self.holding:
            print(
                f"catdog: lost the MLflow tracking server {uri} ({problem}): the stage goes on, "
                f"its tracking writes wait in {self.outbox.journal} until the server is back",
                file=sys.stderr,
                flush=True,
            )
        self.holding = True


class PendingMetrics:
    """Metric batches sent asynchronously (off the training's path) and not yet confirmed."""

    def __init__(self):
        self._sent: list[tuple[dict, object]] = []  # payload, MLflow's RunOperations

    def send(self, run_id: str, payload: dict) -> None:
        metrics = [Metric(**m) for m in payload["metrics"]]
        self._sent.append((payload, MlflowClient().log_batch(run_id, metrics=metrics, synchronous=False)))

    def refused(self) -> Iterator[tuple[dict, Exception]]:
        """Waits for every batch sent so far; yields those the store did not take, with why."""
        sent, self._sent = self._sent, []
        for payload, operations in sent:
            try:
                operations.wait()
            except Exception as exc:
                yield payload, exc


def metrics_payload(values: dict[str, float], step: int) -> dict:
    """A "metrics" write (see :func:`apply`), stamped now: a replay keeps when they were measured."""
    timestamp = int(time.time() * 1000)
    return {"metrics": [{"key": k, "value": v, "timestamp": timestamp, "step": step} for k, v in values.items()]}


def apply(client: MlflowClient, run_id: str, op: str, payload: dict) -> None:
    """One write of a run (see :class:`~catdog.tracking.outbox.Outbox` for the ops), live or replayed."""
    if op == "metrics":
        client.log_batch(run_id, metrics=[Metric(**m) for m in payload["metrics"]])
    elif op == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in payload.items()])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in payload.items()])
    elif op == "artifact":
        client.log_artifact(run_id, payload["path"], payload["artifact_path"])
    elif op == "checkpoint":
        record_checkpoint(client, run_id, payload["md5"])
    elif op == "end":
        client.set_terminated(run_id, payload["status"])
    else:
        raise ValueError(f"unknown tracking write {op!r}")


def send(client: MlflowClient, box: Outbox) -> bool:
    """Replays an outbox in order; True when all of it is sent. What failed and what follows stay."""
    with box.locked():
        ops = box.ops()
        for done, (op, payload) in enumerate(ops):
            try:
                apply(client, box.run_id, op, payload)
            except Exception:
                box.keep_only(ops[done:])
                return False
        box.keep_only([])
    return True


def send_outboxes(client: MlflowClient, store: Path) -> list[str]:
    """Sends every outbox held for the client's tracking URI; the run ids."""
    sent = []
    for box in outbox.pending(store, client.tracking_uri):
        summary = box.summary()
        if not send(client, box):
            raise CatdogError(f"could not send {box.journal} to {client.tracking_uri}: {box.summary()} left")
        print(f"catdog: sent the tracking writes an outage held back ({summary}) to run {box.run_id}", file=sys.stderr)
        sent.append(box.run_id)
    return sent
