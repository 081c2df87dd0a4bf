"""What each subcommand of ``catdog`` does, once ``catdog.cli.arguments`` has parsed its options.

The layers above core are imported inside the command that needs them: ``catdog --help`` loads none of them."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from catdog.cli.arguments import DEFAULT_EXPLAIN_OUT, study_name
from catdog.core.errors import CatdogError
from catdog.core.paths import Paths, find_root


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
    return 0


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


def _default_study(space: Path) -> str:
    try:
        return study_name(space.stem)
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


BY_NAME = {
    "sync": lambda _: sync(),
    "predict": _predict,
    "spark-predict": _spark_predict,
    "tune": _tune,
    "explain": _explain,
}
