"""One trial: ``dvc exp run --temp -n <study>-<k> -S key=value ...`` outside the workspace, then its
figures read back from the experiment's commit.

``--temp`` runs the pipeline in a copy under ``.dvc/tmp/exps``: params.yaml and the outputs of the
workspace stay as they are, the experiment is listed by ``dvc exp show`` and ``dvc exp apply
<name>`` makes it the workspace. Its stages log to the workspace's MLflow store (DVC exports
``DVC_ROOT``) and find the study's parent run in ``CATDOG_PARENT_RUN_ID`` (catdog.tracking).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from catdog.core.errors import CatdogError
from catdog.core.paths import Paths
from catdog.core.recipe import dvc_command
from catdog.tracking.lineage import PARENT_RUN_ENV

_LOCK_BUSY = "Unable to acquire lock"  # another process (the other tune) holds DVC's repository lock
_LOCK_RETRIES, _LOCK_WAIT_S = 30, 4
_STOP_WAIT_S = 60  # a stopped trial's dvc and stage end within seconds (catdog.core.lifecycle)


class TrialFailed(CatdogError):
    """The trial's ``dvc exp run`` failed; the message is its last error line."""


@dataclass(frozen=True)
class TrialResult:
    train: dict  # reports/train/metrics.json of the experiment: the validation figures
    evaluate: dict  # reports/evaluate/metrics.json: the test figures, recorded for information


def run_trial(root: Path, name: str, overrides: dict[str, object], parent_run_id: str, log: Path) -> TrialResult:
    """Run the experiment ``name`` with ``overrides`` (its output in ``log``); its reports."""
    command = dvc_command(overrides)
    command[0:3] = [_dvc(), "exp", "run", "--temp", "-n", name]
    env = {**os.environ, PARENT_RUN_ENV: parent_run_id}
    log.parent.mkdir(parents=True, exist_ok=True)
    for _attempt in range(_LOCK_RETRIES):
        code = _run(command, root, env, log)
        output = log.read_text(errors="replace")
        if code == 0 or _LOCK_BUSY not in output:
            break
        time.sleep(_LOCK_WAIT_S)
    if code != 0:
        raise TrialFailed(last_error_line(output) or f"dvc exp run exited with {code} (log: {log})")
    ref = experiment_ref(root, name)
    relative = Paths(Path("."))
    return TrialResult(
        _committed_json(root, ref, relative.train_metrics), _committed_json(root, ref, relative.evaluate_metrics)
    )


def check_visible(root: Path, source: str) -> None:
    """A git-ignored ``data.source`` (data/digits, say) not tracked by DVC does not exist in the copy
    ``--temp`` runs in: say so before any trial rather than fail each one."""
    path = Path(source)
    if path.is_absolute() or not (root / path).exists():
        return  # outside the project, or prepare names the missing path itself
    ignored = subprocess.run(["git", "check-ignore", "-q", source], cwd=root).returncode == 0
    if ignored and not (root / f"{source.rstrip('/')}.dvc").is_file():
        raise CatdogError(
            f"data.source {source} is git-ignored and not tracked by DVC, so the experiments (which run "
            f"outside the workspace) cannot see it: `dvc add {source}`, or set data.source to its absolute path"
        )


def forget_killed(root: Path, name: str) -> None:
    """What a killed ``dvc exp run --temp -n name`` could not clean up: its copy of the project, which
    ``dvc exp show`` would list as running for ever. Done as DVC's own clean-up does it (the temp
    executor's), its run marked FAILED rather than FINISHED."""
    from dvc.repo.experiments.executor.base import ExecutorInfo, TaskStatus
    from dvc.utils.fs import remove

    for infofile in (root / ".dvc" / "tmp" / "exps" / "run").glob("*/*.run"):
        info = ExecutorInfo.load_json(str(infofile))
        if info.name == name and info.location == "tempdir" and info.status < TaskStatus.FAILED:
            info.status = TaskStatus.FAILED
            info.dump_json(str(infofile))
            remove(info.root_dir)


def last_error_line(output: str) -> str:
    """The line that says what went wrong: the last ``error`` line of the stages or of DVC."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and not line.startswith("ERROR: failed to reproduce")]
    return (errors or lines or [""])[-1]


def experiment_ref(root: Path, name: str) -> str:
    """The git ref of the DVC experiment ``name`` (``refs/exps/../<name>``)."""
    refs = _git(root, "for-each-ref", "--format=%(refname)", "refs/exps").split()
    found = [ref for ref in refs if ref.rsplit("/", 1)[-1] == name]
    if not found:
        raise TrialFailed(f"dvc exp run succeeded but no experiment {name!r} is listed (refs/exps)")
    return found[-1]


def _run(command: list[str], root: Path, env: dict[str, str], log: Path) -> int:
    """The command's exit code. A stop (Ctrl-C, SIGTERM: KeyboardInterrupt here) is passed on as SIGINT to
    its process group, dvc and the stage it runs (dvc itself ignores SIGINT while a stage runs), and
    this waits for them to end."""
    with log.open("w") as out:
        process = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the stop below reaches dvc and its stage
            preexec_fn=_die_with_parent,
        )
        try:
            return process.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(_STOP_WAIT_S)
            raise


def _die_with_parent() -> None:
    """In the child: SIGTERM when the tune process dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG);
    dvc then ends and its stage stops with it (catdog.core.lifecycle)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _dvc() -> str:
    beside = Path(sys.executable).parent / "dvc"  # the venv's dvc, whichever PATH the user has
    return str(beside) if beside.exists() else "dvc"


def _committed_json(root: Path, ref: str, path: Path) -> dict:
    try:
        return json.loads(_git(root, "show", f"{ref}:{path.as_posix()}"))
    except (subprocess.CalledProcessError, json.JSONDecodeError):
        return {}


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout
