"""The ``catdog`` command: ``catdog predict PATH...``, ``catdog tune --space FILE``, ``catdog sync``,
``catdog --version``."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from importlib.metadata import version
from pathlib import Path

from catdog.core.errors import CatdogError
from catdog.core.paths import find_root


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="catdog", description="Image classifier (dogs vs cats by default).")
    parser.add_argument("--version", action="version", version=f"catdog {version('catdog')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    predict_cmd = commands.add_parser(
        "predict",
        help="classify image files, folders or globs",
        description="Classify images with the exported model. Exit code 0 when at least one file was predicted.",
    )
    predict_cmd.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders and/or globs")
    predict_cmd.add_argument(
        "--model",
        default=None,
        help="exported model.onnx, or a registry URI such as models:/catdog@champion "
        "(default: models/export/model.onnx of the project around the cwd)",
    )
    predict_cmd.add_argument(
        "--format",
        choices=("json", "table"),
        default="json",
        help="json: one object per line (default); table: aligned columns",
    )
    predict_cmd.add_argument(
        "--top-k",
        type=_positive_int,
        default=0,
        metavar="K",
        help="also the K most probable labels with their probabilities (a K above the model's class count "
        "gives all classes)",
    )
    predict_cmd.add_argument("--tta", action="store_true", help="average with the mirrored image")
    predict_cmd.add_argument("--batch-size", type=int, default=16)  # ORT activations: 368 MB peak RSS vs 1.1 GB at 64
    _add_tune(commands)
    commands.add_parser(
        "sync",
        help="send the MLflow writes a tracking-server outage held back",
        description="Send what stages kept in mlflow-outbox/ while the tracking server was unreachable "
        "(stages also send it when they start). Uses MLFLOW_TRACKING_URI, like the stages.",
    )
    return parser


def _add_tune(commands) -> None:
    tune_cmd = commands.add_parser(
        "tune",
        help="search params.yaml for the best model: an Optuna study, each trial a DVC experiment",
        description="Run an Optuna study (TPE) over a search space: each trial is `dvc exp run --temp` with its "
        "params (a DVC experiment <study>-<k>, the workspace untouched) and an MLflow run under the study's parent "
        "run. Stopped and started again with the same --study, it continues. See docs/search.md.",
    )
    tune_cmd.add_argument("--space", type=Path, required=True, help="YAML search space (e.g. params/search-cpu.yaml)")
    tune_cmd.add_argument("--study", type=_study_name, help="study name (default: the space file's name)")
    tune_cmd.add_argument("--trials", type=_positive_int, help="the study's total number of trials")
    tune_cmd.add_argument("--timeout", type=_positive_float, metavar="MINUTES", help="stop starting trials after this")
    tune_cmd.add_argument("--metric", default="val_loss", help="key of reports/train/metrics.json (default val_loss)")
    tune_cmd.add_argument(
        "--direction", choices=("minimize", "maximize"), help="default: minimize a *loss metric, else maximize"
    )
    tune_cmd.add_argument("--storage", help="Optuna RDB URL (default: sqlite optuna.db beside mlflow.db)")
    tune_cmd.add_argument("--seed", type=int, default=42, help="the sampler's seed (default 42)")
    tune_cmd.add_argument("--json", action="store_true", help="end with one JSON line: the study's summary")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "tune" and args.trials is None and args.timeout is None:
        parser.error("tune needs a budget: --trials N and/or --timeout MINUTES")
    try:
        if args.command == "tune":
            return _tune(args)
        return sync() if args.command == "sync" else _predict(args)
    except CatdogError as exc:
        print(f"catdog: error: {exc}", file=sys.stderr)
        return 2


def _tune(args: argparse.Namespace) -> int:
    from catdog.search import report
    from catdog.search.study import Search, tune

    metric = args.metric
    search = Search(
        root=_project_root("run catdog tune inside the project"),
        space=args.space.resolve(),
        study=args.study or _default_study(args.space),
        trials=args.trials,
        timeout_min=args.timeout,
        metric=metric,
        direction=args.direction or ("minimize" if metric.endswith("loss") else "maximize"),
        storage=args.storage,
        seed=args.seed,
    )
    try:
        study = tune(search)
    except KeyboardInterrupt:
        print(f"catdog: tune stopped; `catdog tune --study {search.study} ...` continues it", file=sys.stderr)
        return 130
    print(report.best_table(study, metric))
    if args.json:
        print(json.dumps(report.summarise(study)))
    return 0


def sync() -> int:
    from catdog import tracking

    root = _project_root("run it inside the project whose stages held the writes back")
    sent = tracking.send_held_back(root)
    print(f"catdog: {len(sent)} run(s) brought up to date" if sent else "catdog: nothing held back")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from catdog.serving.predict import ExportedModel, expand_paths, predict

    model = ExportedModel.load(args.model or default_model())
    top_k = min(args.top_k, len(model.classes))
    table = Table(model.classes, top_k)
    if args.format == "table":
        print(table.header())
    predicted = 0
    try:
        for result in predict(model, expand_paths(args.paths), args.batch_size, args.tta, top_k):
            predicted += "label" in result
            line = json.dumps(result, allow_nan=False) if args.format == "json" else table.row(result)
            print(line, flush=True)
    except BrokenPipeError:  # `catdog predict ... | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0 if predicted else 1


class Table:
    """``--format table``: label, confidence, the top-k labels (with ``--top-k``) and the path, aligned."""

    def __init__(self, classes: list[str], top_k: int):
        self.label_width = max(len(name) for name in [*classes, "label", "error"])
        self.top_k = top_k
        self.top_k_width = top_k * (self.label_width + 7) + 2 * (top_k - 1)  # "name 0.1234", two spaces apart

    def header(self) -> str:
        return self._line("label", f"{'confidence':>10}", "top_k", "path")

    def row(self, result: dict) -> str:
        if "error" in result:
            return self._line("error", " " * 10, "", f"{result['path']}: {result['error']}")
        ranked = "  ".join(f"{c['label']:<{self.label_width}} {c['probability']:.4f}" for c in result.get("top_k", []))
        return self._line(result["label"], f"{result['confidence']:>10.4f}", ranked, result["path"])

    def _line(self, label: str, confidence: str, ranked: str, path: str) -> str:
        columns = [f"{label:<{self.label_width}}", confidence]
        if self.top_k:
            columns.append(f" {ranked:<{self.top_k_width}}")
        return " ".join(columns) + f"  {path}"


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text!r}")
    return value


def _study_name(text: str) -> str:
    """Also the prefix of its DVC experiments' names (git refs): letters, digits, ``-_.``."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", text):
        raise argparse.ArgumentTypeError(f"must be letters, digits, '-', '_' or '.', got {text!r}")
    return text


def _default_study(space: Path) -> str:
    try:
        return _study_name(space.stem)
    except argparse.ArgumentTypeError as exc:
        raise CatdogError(f"--study: the space file's name {exc}: pass --study NAME") from None


def default_model() -> Path:
    """``models/export/model.onnx`` of the project the cwd is in (any subfolder of it)."""
    from catdog.serving.predict import DEFAULT_MODEL

    return _project_root("pass --model PATH|models:/NAME@ALIAS") / DEFAULT_MODEL


def _project_root(what_to_do: str) -> Path:
    root = find_root(Path.cwd())
    if root is None:
        raise CatdogError(f"no catdog project here (no dvc.yaml in {Path.cwd()} or above): {what_to_do}")
    return root


if __name__ == "__main__":
    sys.exit(main())
