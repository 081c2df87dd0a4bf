"""The parser of the ``catdog`` command: each subcommand's options, their help and their checks."""

from __future__ import annotations

import argparse
import os
import re
from importlib.metadata import version
from pathlib import Path

DEFAULT_EXPLAIN_OUT = Path("reports/explain")  # catdog explain's figures, under the project root


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="catdog", description="Image classifier (dogs vs cats by default).", formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"catdog {version('catdog')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_predict(commands)
    _add_spark_predict(commands)
    _add_tune(commands)
    _add_explain(commands)
    commands.add_parser(
        "sync",
        help="send the MLflow writes a tracking-server outage held back",
        description="Send what stages kept in mlflow-outbox/ while the tracking server was unreachable "
        "(stages also send it when they start). Uses MLFLOW_TRACKING_URI, like the stages.",
    )
    return parser


class _HelpFormatter(argparse.HelpFormatter):
    """argparse measures subcommand names without their indent: a long one (spark-predict) would have
    its help on the next line; each stays on one line here."""

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            longest = max(map(len, action.choices))
            self._action_max_length = max(self._action_max_length, longest + self._current_indent + 2)


def _add_predict(commands) -> None:
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
        type=positive_int,
        default=0,
        metavar="K",
        help="also the K most probable labels with their probabilities (a K above the model's class count "
        "gives all classes)",
    )
    predict_cmd.add_argument("--tta", action="store_true", help="average with the mirrored image")
    predict_cmd.add_argument(
        "--precision",
        choices=("auto", "fp32", "int8", "bf16"),
        default=os.environ.get("CATDOG_PRECISION") or "auto",
        help="which of the model's precisions runs: auto (default, or $CATDOG_PRECISION): the fastest variant "
        "export shipped that this CPU runs; fp32: model.onnx; int8 / bf16: that variant (exit 2 if the model "
        "has none)",
    )
    predict_cmd.add_argument("--batch-size", type=int, default=16)  # ORT activations: 368 MB peak RSS vs 1.1 GB at 64
    predict_cmd.add_argument(
        "--explain",
        type=Path,
        metavar="DIR",
        help="also write, per file, a class activation map (Grad-CAM) over the image (DIR/<name>.png) and the raw "
        "map (DIR/<name>.npy, float32 HxW in [0, 1] at the model's input size), for the top label",
    )
    predict_cmd.add_argument("--explain-class", metavar="NAME", help="with --explain: the map of this class instead")


def _add_spark_predict(commands) -> None:
    spark_cmd = commands.add_parser(
        "spark-predict",
        help="classify a folder, glob or bucket on Spark, into Parquet",
        description="Classify every image file under SOURCE (recursively) with the registered model on Spark "
        "(pip install 'catdog[spark]', Java 17) and write OUTPUT as Parquet: path, label, p_<class> per class, "
        "error. OUTPUT appears only once complete.",
    )
    spark_cmd.add_argument("source", metavar="SOURCE", help="a folder, a glob or a prefix such as s3a://bucket/photos/")
    spark_cmd.add_argument("output", metavar="OUTPUT", help="the Parquet folder to write (local, hdfs://, s3a://...)")
    spark_cmd.add_argument(
        "--model",
        default=None,
        help="an MLflow model URI: models:/NAME@ALIAS, runs:/..., a folder (default: models:/NAME@champion, "
        "NAME the project's export.registered_model_name, from its store or MLFLOW_TRACKING_URI)",
    )
    spark_cmd.add_argument("--master", default=None, help="Spark master URL (default: spark-submit's, else local[*])")
    spark_cmd.add_argument("--batch-size", type=positive_int, default=16, help="images per batch an executor holds")


def _add_tune(commands) -> None:
    tune_cmd = commands.add_parser(
        "tune",
        help="search params.yaml: an Optuna study over DVC experiments",
        description="Run an Optuna study (TPE) over a search space: each trial is `dvc exp run --temp` with its "
        "params (a DVC experiment <study>-<k>, the workspace untouched) and an MLflow run under the study's parent "
        "run. Stopped and started again with the same --study, it continues. See docs/search.md.",
    )
    tune_cmd.add_argument("--space", type=Path, required=True, help="YAML search space (e.g. params/search-cpu.yaml)")
    tune_cmd.add_argument("--study", type=study_name, help="study name (default: the space file's name)")
    tune_cmd.add_argument("--trials", type=positive_int, help="the study's total number of trials")
    tune_cmd.add_argument("--timeout", type=positive_float, metavar="MINUTES", help="stop starting trials after this")
    tune_cmd.add_argument("--metric", default="val_loss", help="key of reports/train/metrics.json (default val_loss)")
    tune_cmd.add_argument(
        "--direction", choices=("minimize", "maximize"), help="default: minimize a *loss metric, else maximize"
    )
    tune_cmd.add_argument("--storage", help="Optuna RDB URL (default: sqlite optuna.db beside mlflow.db)")
    tune_cmd.add_argument("--seed", type=int, default=42, help="the sampler's seed (default 42)")
    tune_cmd.add_argument("--json", action="store_true", help="end with one JSON line: the study's summary")


def _add_explain(commands) -> None:
    explain_cmd = commands.add_parser(
        "explain",
        help="what the trained model sees: feature maps, channel patterns",
        description="Figures of the project's trained model (models/checkpoint.pt) or --model CHECKPOINT, written as "
        f"PNGs into --out (default: {DEFAULT_EXPLAIN_OUT} of the project). See docs/explain.md.",
    )
    views = explain_cmd.add_subparsers(dest="view", required=True, metavar="VIEW")
    activations = views.add_parser("activations", help="feature maps of one image at each stage of the backbone")
    activations.add_argument("image", type=Path, metavar="IMAGE")
    filters = views.add_parser("filters", help="the input pattern that most excites a few channels per stage")
    filters.add_argument("--channels", type=positive_int, default=4, help="channels per stage (default 4)")
    filters.add_argument("--steps", type=positive_int, default=30, help="gradient ascent steps (default 30)")
    filters.add_argument("--size", type=positive_int, default=96, help="pattern size in pixels (default 96)")
    for view in (activations, filters):
        view.add_argument("--model", type=Path, metavar="CHECKPOINT", help="default: models/checkpoint.pt")
        view.add_argument("--out", type=Path, metavar="DIR", help=f"default: {DEFAULT_EXPLAIN_OUT} of the project")


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text!r}")
    return value


def study_name(text: str) -> str:
    """Also the prefix of its DVC experiments' names (git refs): letters, digits, ``-_.``."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", text):
        raise argparse.ArgumentTypeError(f"must be letters, digits, '-', '_' or '.', got {text!r}")
    return text
