"""The ``catdog`` command: ``catdog predict PATH...``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from catdog.errors import CatdogError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="catdog", description="Dogs vs cats classifier.")
    commands = parser.add_subparsers(dest="command", required=True)
    predict_cmd = commands.add_parser(
        "predict", help="classify image files or folders; prints one JSON object per line")
    predict_cmd.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")
    predict_cmd.add_argument("--model", default=None,
                             help="exported ONNX model (default: models/export/model.onnx)")
    predict_cmd.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    from catdog.predict import DEFAULT_MODEL, ExportedModel, expand_paths, predict

    try:
        model = ExportedModel.load(Path(args.model) if args.model else DEFAULT_MODEL)
    except CatdogError as exc:
        print(f"catdog: error: {exc}", file=sys.stderr)
        return 2
    predicted = 0
    for result in predict(model, expand_paths(args.paths), args.batch_size):
        predicted += "label" in result
        print(json.dumps(result), flush=True)
    return 0 if predicted else 1


if __name__ == "__main__":
    sys.exit(main())
