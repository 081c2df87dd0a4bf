"""Shared by the tests that run the real ``dvc`` in a throwaway copy of the repository.

``copy_project`` copies the repository (git-tracked + untracked-not-ignored files) into a temp
dir, adds a tiny synthetic Kaggle-layout zip, writes tiny params and commits it all in a fresh
git repository. ``Project`` runs commands there with an environment cleaned of the developer's
MLflow/DVC/git variables and reads back its files and its MLflow store (``<root>/mlflow.db``).

Nothing is mocked: the tests drive the real dvc, mlflow and catdog of the venv pytest runs in.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv pytest runs from: python, dvc, mlflow, catdog live here
STAGES = ("prepare", "audit", "train", "evaluate", "export")
EXPERIMENT = "catdog"
PER_CLASS = 16
COLOURS = {"cat": (200, 70, 40), "dog": (40, 90, 210)}  # class-separable mean colours
REPRO_TIMEOUT = 600


def tail(text: str, lines: int = 60) -> str:
    return "\n".join((text or "").splitlines()[-lines:])


def describe(proc: subprocess.CompletedProcess) -> str:
    return (
        f"$ {' '.join(map(str, proc.args))}\nexit code {proc.returncode}\n"
        f"--- stdout (tail) ---\n{tail(proc.stdout)}\n--- stderr (tail) ---\n{tail(proc.stderr)}"
    )


def tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name!r} not found beside {sys.executable} nor on PATH: run `make install`")
    return found


def _jpeg(rng: np.random.Generator, colour: tuple[int, int, int]) -> bytes:
    height, width = rng.integers(56, 97, size=2)
    pixels = np.clip(np.asarray(colour) + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_tiny_zip(path: Path, seed: int = 0, per_class: int = PER_CLASS) -> None:
    """Kaggle layout (``train/cat.N.jpg``), plus one corrupt member prepare must reject."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for label, colour in COLOURS.items():
            for index in range(per_class):
                archive.writestr(f"train/{label}.{index}.jpg", _jpeg(rng, colour))
        archive.writestr("train/cat.999.jpg", b"this is not a jpeg")


def cached_outputs(dvc_yaml: Path) -> list[str]:
    """Paths of the outs/metrics/plots of dvc.yaml that DVC caches (``cache`` not false)."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    paths = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                path, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
                if (options or {}).get("cache", True) and "${" not in path:
                    paths.append(path)
    return paths


def git_files(root: Path) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    return sorted({name for name in out.decode().split("\0") if name})


def stage_runs(stdout: str) -> set[str]:
    import re

    return set(re.findall(r"Running stage '([\w-]+)'", stdout))


def free_port() -> int:
    """A currently free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without MLflow/DVC/git variables, with the venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "GIT_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(BIN.parent),
        PYTHONUNBUFFERED="1",
        TQDM_DISABLE="1",
        **extra,
    )
    return env


@dataclass
class Project:
    root: Path
    env: dict[str, str]
    repros: list[str] = field(default_factory=list)  # stdout of each dvc repro, in order
    first: object | None = None  # test_pipeline: the state right after the first repro

    # ---- processes
    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: int = 120,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            list(args), cwd=cwd or self.root, env=env or self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            pytest.fail(f"command failed in {cwd or self.root}\n{describe(proc)}", pytrace=False)
        return proc

    def dvc(self, *args: str, timeout: int = REPRO_TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
        return self.run(tool("dvc"), *args, timeout=timeout, **kwargs)

    def git(self, *args: str, cwd: Path | None = None) -> str:
        return self.run(
            "git",
            "-c",
            "user.name=catdog-test",
            "-c",
            "user.email=test@example.invalid",
            "-c",
            "commit.gpgsign=false",
            "-c",
            "core.hooksPath=/dev/null",
            *args,
            cwd=cwd,
        ).stdout.strip()

    def repro(self) -> str:
        proc = self.dvc("repro")
        self.repros.append(proc.stdout)
        return proc.stdout

    # ---- files
    def json(self, relative: str):
        path = self.root / relative
        assert path.is_file(), f"{relative} was not written"
        return json.loads(path.read_text())

    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def set_params(self, updates: dict[str, dict]) -> None:
        params = self.params()
        for section, values in updates.items():
            unknown = set(values) - set(params[section])
            assert not unknown, f"params.yaml has no {section}.{sorted(unknown)} (keys renamed?)"
            params[section].update(values)
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    # ---- MLflow
    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root}/mlflow.db"

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def experiment_id(self) -> str:
        experiment = self.client().get_experiment_by_name(EXPERIMENT)
        assert experiment is not None, f"no MLflow experiment {EXPERIMENT!r} in {self.root}/mlflow.db"
        return experiment.experiment_id

    def runs(self) -> list:
        return self.client().search_runs([self.experiment_id()], order_by=["attributes.start_time ASC"])

    def artifacts(self, run_id: str, path: str | None = None) -> set[str]:
        """Every artifact file of the run, recursively."""
        client, found = self.client(), set()
        for info in client.list_artifacts(run_id, path):
            found |= self.artifacts(run_id, info.path) if info.is_dir else {info.path}
        return found


def copy_project(root: Path, params: dict[str, dict], per_class: int = PER_CLASS) -> Project:
    """The repository copied to ``root`` with a tiny zip at data/tiny.zip and ``params`` merged
    into params.yaml, committed in a fresh git repository (nothing run yet)."""
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout of the project (git ls-files)")
    for name in git_files(REPO):
        source = REPO / name
        if source.is_file():  # tracked but deleted in the working tree: skip
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)

    proj = Project(root, clean_env(PYTHONPATH=str(root / "src")))  # the stages import the copy DVC hashes

    make_tiny_zip(root / "data" / "tiny.zip", per_class=per_class)
    proj.set_params(params)

    proj.git("init", "-q")
    proj.git("add", "-A")
    # DVC refuses to save a cached output that git tracks ("already tracked by SCM"); the
    # repository once committed some. test_repository_does_not_git_track_dvc_cached_outputs
    # guards against that; here it only keeps the pipeline test about the pipeline.
    if outs := cached_outputs(root / "dvc.yaml"):
        proj.git("rm", "-r", "-q", "--cached", "--ignore-unmatch", "--", *outs)
    proj.git("commit", "-q", "-m", "tiny pipeline")
    return proj


# --------------------------------------------------------------------------- servers


def wait_for_http(
    url: str, proc: subprocess.Popen | None = None, timeout: float = 120, log: Path | None = None
) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(
                f"server exited with {proc.returncode} before answering {url}\n"
                f"{tail(log.read_text()) if log and log.exists() else ''}",
                pytrace=False,
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(
        f"{url} did not answer within {timeout:.0f} s\n{tail(log.read_text()) if log and log.exists() else ''}",
        pytrace=False,
    )


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate a server started with ``start_new_session=True`` (the process and its workers)."""
    if proc.poll() is not None:
        return
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


@contextlib.contextmanager
def serve_model(model_uri: str, tracking_uri: str, cwd: Path, timeout: float = 180):
    """``mlflow models serve -m MODEL_URI`` as a real process on loopback (the README's command);
    yields ``post(body) -> the reply's text`` for /invocations, then stops the server."""
    port, log = free_port(), cwd / "serve.log"
    command = ["models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1", "-w", "1"]
    with log.open("w") as handle:
        server = subprocess.Popen(
            [tool("mlflow"), *command, "-p", str(port)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            env=clean_env(MLFLOW_TRACKING_URI=tracking_uri),
        )

    def post(body: dict) -> str:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read().decode()

    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, timeout=timeout, log=log)
        yield post
    finally:
        stop(server)


def start_mlflow(
    command: str,
    args: list[str],
    port: int,
    log: Path,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.Popen:
    """``mlflow COMMAND ARGS --host 127.0.0.1 --port PORT`` (``server`` or ``ui``) in ``cwd``, in its
    own process group (see ``stop``); returns once /health answers."""
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = log.open("w")
    proc = subprocess.Popen(
        [tool("mlflow"), command, *args, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=env or clean_env(),
        cwd=cwd,
        start_new_session=True,
    )
    handle.close()
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc, timeout, log)
    except BaseException:
        stop(proc)
        raise
    return proc


# --------------------------------------------------------------------------- shared experiments

TINY_PARAMS = {  # what every real-pipeline test here starts from: ~15 s per stage on 2 cores
    "data": {
        "source": "data/tiny.zip",
        "cache_size": 64,
        "min_per_class": 4,
        "min_image_size": 32,
        "limit_per_class": None,
        "workers": 1,
    },
    "train": {
        **{"arch": "efficientnet_lite0", "image_size": 64, "epochs": 2, "batch_size": 8, "lr": 0.001, "workers": 0},
        "head": "gradient",  # epochs and lr matter to these tests (head auto fits a logistic head once)
    },
    "evaluate": {"batch_size": 16},
    "export": {"precision": []},  # int8/bf16 variants: tests/test_variants.py and the session pipeline
}
BASELINE_LR = TINY_PARAMS["train"]["lr"]
WORKSPACE_EXP, WORKSPACE_LR = "ws-lr", 0.003
QUEUED = {"q-lr-a": 0.01, "q-lr-b": 0.02}  # run in parallel by `dvc queue start -j 2`
EVAL_EXP, EVAL_BATCH = "ws-eval", 8  # only evaluate.* changes: a derived MLflow run
EVAL_BACK_EXP = "ws-eval-back"  # evaluate.batch_size back to 16: evaluate/export from the run-cache
QUEUE_TIMEOUT = 900


@dataclass
class Step:
    """What one command did: its output, and the project's state right after it."""

    name: str
    output: str  # stdout + stderr
    seconds: float
    run_ids: tuple[str, ...]  # every run in the project store, oldest first ('' = no store yet)
    params: dict  # params.yaml of the workspace


@dataclass
class Experiments:
    project: Project
    baseline_rev: str
    baseline_store: Path  # where the plain `dvc repro` of the baseline logged (MLFLOW_TRACKING_URI)
    remote: Path  # the local-directory DVC remote the baseline was pushed to
    steps: dict[str, Step]
    queue_status: str = ""
    queue_logs: dict[str, str] = field(default_factory=dict)

    def run_named(self, name: str):
        """The one MLflow run of the project store named ``name``."""
        runs = [r for r in self.project.runs() if r.info.run_name == name]
        assert len(runs) == 1, f"{len(runs)} runs named {name!r}: {[r.info.run_name for r in self.project.runs()]}"
        return runs[0]


_shared: dict[str, object] = {}


def experiments(tmp_path_factory) -> Experiments:
    """The session's shared experiments project (see tests/test_experiments.py), built on first use."""
    if "experiments" not in _shared:
        try:
            _shared["experiments"] = _build_experiments(tmp_path_factory.mktemp("experiments"))
        except BaseException as exc:
            _shared["experiments"] = exc
            raise
    built = _shared["experiments"]
    if isinstance(built, BaseException):
        pytest.fail(f"building the shared experiments project failed earlier: {built}", pytrace=False)
    return built


def _step(proj: Project, name: str, proc: subprocess.CompletedProcess | None, seconds: float) -> Step:
    run_ids: tuple[str, ...] = ()
    if (proj.root / "mlflow.db").exists():
        run_ids = tuple(r.info.run_id for r in proj.runs())
    output = "" if proc is None else f"{proc.stdout}\n{proc.stderr}"
    return Step(name, output, seconds, run_ids, proj.params())


def _timed(proj: Project, name: str, steps: dict[str, Step], *args: str, env: dict[str, str] | None = None) -> Step:
    start = time.monotonic()
    proc = proj.dvc(*args, env=env)
    steps[name] = _step(proj, name, proc, time.monotonic() - start)
    return steps[name]


def _build_experiments(base: Path) -> Experiments:
    root = base / "project"
    proj = copy_project(root, TINY_PARAMS)
    steps: dict[str, Step] = {}

    # Baseline: a plain `dvc repro`, logged to a store outside the project (MLFLOW_TRACKING_URI),
    # so that the queued experiments below meet a fresh project store; committed, then pushed.
    baseline_store = base / "baseline-store" / "mlflow.db"
    remote = base / "dvc-remote"
    proj.dvc("remote", "add", "-d", "storage", str(remote))
    _timed(proj, "baseline", steps, "repro", env={**proj.env, "MLFLOW_TRACKING_URI": f"sqlite:///{baseline_store}"})
    assert not (root / "mlflow.db").exists(), "MLFLOW_TRACKING_URI was not honoured"
    proj.git("add", "-A")
    proj.git("commit", "-q", "-m", "baseline: tiny pipeline reproduced, DVC remote configured")
    baseline_rev = proj.git("rev-parse", "HEAD")
    _timed(proj, "push", steps, "push")
    built = Experiments(proj, baseline_rev, baseline_store, remote, steps)

    # Two queued experiments, executed in parallel in .dvc/tmp/exps on a store that does not exist yet.
    for name, lr in QUEUED.items():
        proj.dvc("exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}")
    start = time.monotonic()
    try:
        proj.dvc("queue", "start", "-j", "2")
        deadline = time.monotonic() + QUEUE_TIMEOUT
        while True:
            status = proj.dvc("queue", "status").stdout
            if not any(state in status for state in ("Queued", "Running")):
                break
            if time.monotonic() > deadline:
                proj.dvc("queue", "kill", *QUEUED, check=False)
                pytest.fail(f"queued experiments still running after {QUEUE_TIMEOUT} s:\n{status}", pytrace=False)
            time.sleep(3)
    finally:
        proj.dvc("queue", "stop", check=False, timeout=60)  # the workers, should any still be up
    built.queue_status = status
    built.queue_logs = {name: proj.dvc("queue", "logs", name, check=False).stdout for name in QUEUED}
    steps["queue"] = _step(proj, "queue", None, time.monotonic() - start)

    # Workspace experiments.
    _timed(proj, WORKSPACE_EXP, steps, "exp", "run", "-n", WORKSPACE_EXP, "-S", f"train.lr={WORKSPACE_LR}")
    _timed(proj, EVAL_EXP, steps, "exp", "run", "-n", EVAL_EXP, "-S", f"evaluate.batch_size={EVAL_BATCH}")
    back = TINY_PARAMS["evaluate"]["batch_size"]
    _timed(proj, EVAL_BACK_EXP, steps, "exp", "run", "-n", EVAL_BACK_EXP, "-S", f"evaluate.batch_size={back}")
    return built
