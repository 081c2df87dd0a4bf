"""How a stage process ends: never as an orphan, never leaving its MLflow run RUNNING.

- SIGTERM or SIGINT (Ctrl-C) raise :class:`StageStopped` in the main thread: the stage unwinds,
  its MLflow run is marked KILLED (catdog.tracking) and it exits with 130. Train's resumable
  state is saved after every epoch, so a rerun continues from there.
- On Linux the stage asks the kernel for SIGTERM when its parent (dvc) dies: a killed
  ``dvc repro`` takes its stage with it instead of leaving it training unsupervised.
- Every run records the host, PID and process start time of the stage that has it open; a
  SIGKILLed stage cannot close its run, so the next stage of the experiment closes it
  (:func:`process_gone`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
from collections.abc import Iterator

import psutil

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
HOST_TAG, PID_TAG, STARTED_TAG = "catdog.host", "catdog.pid", "catdog.pid_started"


class StageStopped(BaseException):
    """Raised by a stop signal; a BaseException so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name}")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM/SIGINT and the parent's death raise StageStopped while the block runs."""
    previous = {signum: signal.signal(signum, _raise_stop) for signum in STOP_SIGNALS}
    _parent_death_signal(signal.SIGTERM)
    try:
        yield
    finally:
        _parent_death_signal(0)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _raise_stop(signum: int, frame) -> None:
    for each in STOP_SIGNALS:  # a second signal ends the process at once, cleanup or not
        signal.signal(each, signal.SIG_DFL)
    raise StageStopped(signum)


def _parent_death_signal(signum: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)


def process_tags() -> dict[str, str]:
    """Which process has the run open (tags), so that another can tell when it is gone."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), STARTED_TAG: str(psutil.Process().create_time())}


def process_gone(tags: dict[str, str]) -> bool:
    """Whether the process recorded in a run's ``tags`` (by :func:`process_tags`) has ended.
    False when it ran on another host or recorded nothing: then nobody here can know."""
    if tags.get(HOST_TAG) != socket.gethostname() or PID_TAG not in tags:
        return False
    pid = int(tags[PID_TAG])
    if pid == os.getpid():
        return False
    try:
        process = psutil.Process(pid)
        reused = str(process.create_time()) != tags.get(STARTED_TAG)
        return reused or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
