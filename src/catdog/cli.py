"""The ``catdog`` command: ``catdog predict PATH...``, ``catdog explain {activations,filters}``,
``catdog spark-predict SOURCE OUTPUT``, ``catdog tune --space FILE``, ``catdog sync``, ``catdog --version``."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from importlib.metadata import version
from pathlib import Path

from catdog.core.errors import CatdogError
from catdog.core.paths import Paths, find_root

DEFAULT_EXPLAIN_OUT = Path("reports/explain")  # catdog explain's figures, under the project root


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="catdog", description="Image classifier (dogs vs cats by default).", formatter_class=_HelpFormatter
    )
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
    spark_cmd.add_argument("--batch-size", type=_positive_int, default=16, help="images per batch an executor holds")
    _add_tune(commands)
    _add_explain_command(commands)
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


def _add_explain_command(commands) -> None:
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
    filters.add_argument("--channels", type=_positive_int, default=4, help="channels per stage (default 4)")
    filters.add_argument("--steps", type=_positive_int, default=30, help="gradient ascent steps (default 30)")
    filters.add_argument("--size", type=_positive_int, default=96, help="pattern size in pixels (default 96)")
    for view in (activations, filters):
        view.add_argument("--model", type=Path, metavar="CHECKPOINT", help="default: models/checkpoint.pt")
        view.add_argument("--out", type=Path, metavar="DIR", help=f"default: {DEFAULT_EXPLAIN_OUT} of the project")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "tune" and args.trials is None and args.timeout is None:
        parser.error("tune needs a budget: --trials N and/or --timeout MINUTES")
    try:
        commands = {
            "sync": lambda _: sync(),
            "predict": _predict,
            "spark-predict": _spark_predict,
            "tune": _tune,
            "explain": _explain,
        }
        return commands[args.command](args)
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

    model = ExportedModel.load(args.model or default_model(), args.precision)
    explain, explain_class = _explainer(args, model)
    top_k = min(args.top_k, len(model.classes))
    table = Table(model.classes, top_k)
    if args.format == "table":
        print(table.header())
    predicted = failed = 0
    try:
        files = expand_paths(args.paths)
        for result in predict(model, files, args.batch_size, args.tta, top_k, explain, explain_class):
            predicted += "label" in result
            failed += "error" in result
            line = json.dumps(result, allow_nan=False) if args.format == "json" else table.row(result)
            print(line, flush=True)
    except BrokenPipeError:  # `catdog predict ... | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    print(f"catdog: {predicted} predicted, {failed} errors, precision {model.precision}", file=sys.stderr)
    return 0 if predicted else 1


def _spark_predict(args: argparse.Namespace) -> int:
    try:
        from catdog.serving.spark import spark_predict
    except ModuleNotFoundError as exc:
        raise CatdogError(f"spark-predict needs {exc.name}: pip install 'catdog[spark]'") from None
    model = args.model or default_registered_model()
    written = spark_predict(args.source, args.output, model, args.master, args.batch_size)
    print(f"catdog: {written.files} files, {written.errors} errors -> {args.output}")


def _explainer(args: argparse.Namespace, model) -> tuple:
    """(the Explainer of --explain or None, the class index of --explain-class or None)."""
    if args.explain is None:
        if args.explain_class is not None:
            raise CatdogError("--explain-class needs --explain DIR")
        return None, None
    if args.explain_class is not None and args.explain_class not in model.classes:
        raise CatdogError(f"unknown --explain-class {args.explain_class!r}: the model's classes are {model.classes}")
    from catdog.core.paths import PT2_FILE
    from catdog.explain.exported import Explainer

    chosen = model.classes.index(args.explain_class) if args.explain_class is not None else None
    return Explainer(model.source.parent / PT2_FILE, args.explain), chosen


def _explain(args: argparse.Namespace) -> int:
    from catdog.data.images import BadImage
    from catdog.explain import views
    from catdog.models.factory import load_checkpoint

    root = find_root(Path.cwd())
    if args.model is None and root is None:
        raise CatdogError(f"no catdog project here (no dvc.yaml in {Path.cwd()} or above): pass --model CHECKPOINT")
    checkpoint = args.model or Paths.under(root).checkpoint
    out = args.out or (root or Path.cwd()) / DEFAULT_EXPLAIN_OUT
    model, config = load_checkpoint(checkpoint)
    name = f"{config['arch']} ({checkpoint.name})"
    if args.view == "activations":
        try:
            image = views.load_image(args.image, config)
        except (OSError, BadImage) as exc:
            raise CatdogError(f"cannot read {args.image}: {exc}") from None
        written = views.activations(
            model, image, out / f"activations-{args.image.stem}.png", f"{name}: feature maps of {args.image.name}"
        )
    else:
        title = f"{name}: inputs that most excite channels of each stage"
        written = views.filters(model, out / "filters.png", title, args.channels, args.size, args.steps)
    print(written)
    return 0


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


def default_registered_model() -> str:
    """``models:/<export.registered_model_name>@champion`` of the project the cwd is in."""
    from catdog.core.params import load_params

    root = _project_root("pass --model URI")
    name = load_params(root / "params.yaml").export.registered_model_name
    if not name:
        raise CatdogError("export.registered_model_name is null: nothing is registered, pass --model URI")
    return f"models:/{name}@champion"


def _project_root(what_to_do: str) -> Path:
    root = find_root(Path.cwd())
    if root is None:
        raise CatdogError(f"no catdog project here (no dvc.yaml in {Path.cwd()} or above): {what_to_do}")
    return root


if __name__ == "__main__":
    sys.exit(main())
