"""How a stage process ends: never as an orphan, never leaving its MLflow run RUNNING.

- SIGTERM or SIGINT (Ctrl-C) raise :class:`StageStopped` in the main thread: the stage unwinds,
  its MLflow run is marked KILLED (catdog.tracking) and it exits with 130. Train's resumable
  state is saved after every epoch, so a rerun continues from there.
- A watcher thread sends the stage SIGTERM when the process that started it (dvc) ends: a
  killed ``dvc repro`` takes its stage with it instead of leaving it training unsupervised.
  dvc starts stages through ``$SHELL -c``; dash (Debian's /bin/sh) does not exec the command, and
  that shell outlives dvc, so the watcher looks past it (the kernel's PR_SET_PDEATHSIG would not).
- Every run records the host, PID and process start time of the stage that has it open; a
  SIGKILLed stage cannot close its run, so the next stage of the experiment closes it
  (:func:`process_gone`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator

import psutil

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "fish"}
_WATCH_SECONDS = 1.0
HOST_TAG, PID_TAG, STARTED_TAG = "catdog.host", "catdog.pid", "catdog.pid_started"


class StageStopped(BaseException):
    """Raised by a stop signal; a BaseException so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name}")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM/SIGINT and the end of the process that started this one raise StageStopped
    while the block runs."""
    previous = {signum: signal.signal(signum, _raise_stop) for signum in STOP_SIGNALS}
    done = threading.Event()
    starter = _starter()
    if starter is not None:
        threading.Thread(target=_stop_when_gone, args=(starter, done), name="catdog-starter-watch", daemon=True).start()
    try:
        yield
    finally:
        done.set()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_behind(exc: BaseException) -> StageStopped | None:
    """The stop that ``exc`` was raised while unwinding, if any. A stop arrives anywhere, also inside a
    library whose clean-up then fails on what it left half done (torch.save's zip writer: "unexpected
    pos"); that error hides the stop, which is still what ended the stage."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, StageStopped):
            return exc
        seen.add(id(exc))
        exc = exc.__context__
    return None


def _raise_stop(signum: int, frame) -> None:
    for each in STOP_SIGNALS:  # a second signal ends the process at once, cleanup or not
        signal.signal(each, signal.SIG_DFL)
    raise StageStopped(signum)


def _starter() -> psutil.Process | None:
    """The process that started this one (dvc, a terminal's shell, torchrun), past any
    non-interactive ``sh -c`` wrapper; None when it cannot be known."""
    try:
        process = psutil.Process().parent()
        while process is not None and process.name() in _SHELLS and "-c" in process.cmdline()[1:]:
            process = process.parent()
        return process
    except psutil.Error:
        return None


def _stop_when_gone(starter: psutil.Process, done: threading.Event) -> None:
    while not done.wait(_WATCH_SECONDS):
        if _ended(starter):
            os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread like any SIGTERM
            return


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
        return str(process.create_time()) != tags.get(STARTED_TAG) or _ended(process)
    except psutil.NoSuchProcess:
        return True


def _ended(process: psutil.Process) -> bool:
    """Gone, its PID reused, or a zombie nobody has reaped yet."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
