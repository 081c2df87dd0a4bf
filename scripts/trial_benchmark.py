"""The trial rows of scripts/benchmark.py: a DVC experiment that changes only train params, against
the first `dvc repro` of the same project (imports, prepare, ONNX export of the backbone, feature
extraction: everything a trial should not pay again).

Each runs in a copy of the repository (its git-tracked files, no dvc.lock) with a fresh catdog cache
(``CATDOG_CACHE``), so the first run is a first run; the trial then finds the frozen features and the
backbone's ONNX graph in that cache, as a second experiment does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # dvc and python of this venv
SAMPLE = ROOT / "data/sample/dogs-vs-cats-sample.zip"


def trial_project(where: Path, source: Path, args) -> dict[str, str]:
    """The repository copied to ``where`` with ``source`` and the benchmark's model params; returns
    the environment its commands run in."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file() and name != "dvc.lock":
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, where / name)
    params = yaml.safe_load((where / "params.yaml").read_text())
    params["data"].update(source=str(source.resolve()), cache_size=args.image_size, min_per_class=3)
    params["train"].update(arch=args.arch, image_size=args.image_size, batch_size=args.batch_size)
    params["train"]["pretrained"] = args.arch != "simple_cnn"
    (where / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "GIT_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(where / "src"),
        CATDOG_CACHE=str(where.parent / f"{where.name}-cache"),  # empty: the first run pays for everything
        TQDM_DISABLE="1",
    )
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "benchmark project"]):
        _run(["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid", *command], where, env)
    return env


def timed_trials(where: Path, source: Path, changes: list[str], args) -> tuple[float, list[float]]:
    """(seconds of the first `dvc repro`, seconds of `dvc exp run -S <change>` for each change in turn)."""
    where.mkdir(parents=True)
    env = trial_project(where, source, args)
    first = _timed(["dvc", "repro"], where, env)
    return first, [_timed(["dvc", "exp", "run", "-S", change], where, env) for change in changes]


def _timed(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    _run(command, cwd, env)
    return time.perf_counter() - started


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed in {cwd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
