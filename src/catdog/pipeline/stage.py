"""The shared entry of the thin ``stages/<name>.py`` CLIs that dvc.yaml runs."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import gc
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import NoReturn

from catdog.core.errors import CatdogError
from catdog.core.lifecycle import StageStopped, stop_behind, stop_on_signals
from catdog.core.params import Params, load_params
from catdog.core.paths import Paths

# Allocations between two collections of the youngest generation in a stage process (Python's default: 700)
STAGE_GC_THRESHOLD = 50_000


@contextlib.contextmanager
def stage_imports() -> Iterator[None]:
    """Around a stage script's imports: Python's cyclic collector tuned for one short process.

    Importing torch, MLflow and scikit-learn makes ~430,000 objects that live until the process ends,
    and the collector walked them over and over: 0.5-0.9 s of a stage (export the most: a torch.export
    program is many small objects). So the collector is paused while the modules import, what they made
    is frozen (``gc.freeze``: never walked again), and the youngest generation is collected every
    STAGE_GC_THRESHOLD allocations instead of 700. Cycles are still collected."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.set_threshold(STAGE_GC_THRESHOLD, *gc.get_threshold()[1:])
        gc.enable()


def main(
    name: str, run: Callable[[Params, Paths], dict], argv: list[str] | None = None, *, ends_process: bool = False
) -> None:
    """Runs the stage as a CLI: one summary line, or one error line and exit 1/2, or exit 130 when stopped.
    ``ends_process`` (the stage scripts): after the summary the process ends without the interpreter's
    teardown (:func:`exit_without_teardown`)."""
    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=f"catdog {name} stage")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--root", default=".", help="project root (default: current directory)")
    args = parser.parse_args(argv)
    try:
        metrics = _run_until_stopped(run, args)
    except (CatdogError, OSError) as exc:
        if os.environ.get("CATDOG_DEBUG") == "1":
            raise
        print(f"{name}: error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, CatdogError) else 1)
    except StageStopped as stop:
        print(
            f"{name}: {stop}: its MLflow run is marked KILLED; rerun (dvc repro) to continue "
            "(train resumes after its last finished epoch)",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(130)  # the run is closed: skip the interpreter's slow teardown (torch, MLflow threads)
    print(summary_line(name, metrics))
    if os.environ.get("CATDOG_DEBUG") == "1":
        print(f"{name}: {json.dumps(metrics, default=str)}")
    if ends_process:
        exit_without_teardown(0)


def exit_without_teardown(code: int) -> NoReturn:
    """Ends the process as ``sys.exit(code)`` would, less the interpreter's teardown of every loaded
    module: 0.5-1.2 s with torch, MLflow and scikit-learn loaded, paid by each stage of each trial.
    What an exit does before that teardown still happens, in its order: the threads are waited for
    (library thread pools shut down), the exit handlers run (MLflow's flushes, temporary folders,
    logging), the output streams are flushed."""
    threading._shutdown()  # the interpreter's first step at exit (CPython's Py_FinalizeEx)
    atexit._run_exitfuncs()  # its second
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_until_stopped(run: Callable[[Params, Paths], dict], args: argparse.Namespace) -> dict:
    """The stage's results; StageStopped when a stop signal ended it, even where a library's failed
    clean-up raised on top of the stop (catdog.core.lifecycle.stop_behind)."""
    try:
        with stop_on_signals():
            params = load_params(args.params)  # validated in full before any work starts
            return run(params, Paths.under(args.root))
    except Exception as exc:
        if (stop := stop_behind(exc)) is None:
            raise
        raise stop from None


SUMMARY_FIGURES = 10  # at most, in the summary line; CATDOG_DEBUG=1 prints every result as JSON
NOTES = "notes"  # a result holding lines for a person (evaluate's most-confused pairs), each printed after the summary


def summary_line(name: str, results: dict) -> str:
    """The stage's one line for a person: its headline figures (``name: accuracy 0.9904, log_loss
    0.0421, ...``), then one line per entry of ``results[NOTES]``. Nested results (per class, per split)
    and the breakdowns of a figure shown (``precision_<class>`` beside ``precision``) are left to the
    stage's reports."""
    notes = "".join(f"\n{name}: {note}" for note in results.get(NOTES, []))
    results = {k: v for k, v in results.items() if k != NOTES}
    scalars = {k: v for k, v in results.items() if isinstance(v, (bool, int, float, str))}
    headline = [k for k in scalars if not any(k.startswith(f"{other}_") for other in scalars if other != k)]
    figures = [f"{key} {_figure(scalars[key])}" for key in headline[:SUMMARY_FIGURES]]
    more = len(results) - len(figures)
    line = f"{name}: {', '.join(figures)}" + (f" (+{more} more: CATDOG_DEBUG=1 prints all)" if more else "")
    return line + notes


def _figure(value: bool | int | float | str) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


_OS_HINTS = {
    errno.ENOSPC: "free some disk space, then rerun",
    errno.EDQUOT: "free some disk space, then rerun",
    errno.EACCES: "check the permissions of that path",
    errno.EPERM: "check the permissions of that path",
    errno.EROFS: "the file system is read-only: run where the project can be written",
}


def _one_line(exc: Exception) -> str:
    """An expected failure in one line (a disk, permission or store problem is not a bug:
    no traceback unless CATDOG_DEBUG=1)."""
    if not isinstance(exc, OSError):
        return str(exc)
    where = f": {exc.filename}" if exc.filename else ""
    hint = _OS_HINTS.get(exc.errno, "")
    return f"{exc.strerror or exc}{where}" + (f" ({hint})" if hint else "")
