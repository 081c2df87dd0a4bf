"""Accuracy and throughput of `catdog predict` on images the pipeline never saw.

    python scripts/heldout_accuracy.py ../shared/data/dogs-vs-cats/train.zip --per-class 1000

Takes Kaggle-named images (<class>.<n>.<ext>, any classes) from a zip, skipping every name in the
committed sample, writes them to a temp folder and runs the real `catdog predict` CLI on it, once per
precision: fp32 and every variant the model ships (variants.json), each with `--precision`; a variant's
accuracy should stay within 0.3 points of fp32's (``accuracy_gap_points``). Log loss needs every
class's probability: with two classes it follows from predict's confidence, with more it is left out.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
import time
import zipfile
from collections import defaultdict
from pathlib import Path, PurePosixPath

from sklearn.metrics import log_loss

from catdog.data.layouts import kaggle_label
from catdog.serving.precision import shipped_variants

SAMPLE = Path("data/sample/dogs-vs-cats-sample.zip")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zip", help="Kaggle-layout zip (<class>.<n>.jpg members, e.g. cat.N.jpg / dog.N.jpg)")
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--model", default="models/export/model.onnx")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    with zipfile.ZipFile(SAMPLE) as sample:
        seen = {PurePosixPath(n).name for n in sample.namelist()}
    with zipfile.ZipFile(args.zip) as archive, tempfile.TemporaryDirectory() as folder:
        by_class = defaultdict(list)
        for name in sorted(archive.namelist()):
            if kaggle_label(name) is not None and PurePosixPath(name).name not in seen:
                by_class[kaggle_label(name)].append(name)
        for label, of_label in sorted(by_class.items()):
            for name in random.Random(f"{args.seed}-{label}").sample(of_label, args.per_class):
                (Path(folder) / PurePosixPath(name).name).write_bytes(archive.read(name))
        precisions = list(dict.fromkeys(["fp32", *shipped_variants(Path(args.model))]))
        report = {p: heldout_figures(folder, args.model, p, sorted(by_class)) for p in precisions}
    for precision in precisions[1:]:
        gap = report["fp32"]["accuracy"] - report[precision]["accuracy"]
        report[precision]["accuracy_gap_points"] = round(gap * 100, 2)
    print(json.dumps(report))


def heldout_figures(folder: str, model: str, precision: str, classes: list[str]) -> dict:
    """`catdog predict --precision PRECISION` on ``folder``: accuracy, log loss (two classes), speed."""
    started = time.perf_counter()
    proc = subprocess.run(
        ["catdog", "predict", folder, "--model", model, "--precision", precision],
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - started
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    predicted = [r for r in results if "label" in r]
    truth = [kaggle_label(r["path"]) for r in predicted]
    correct = sum(r["label"] == label for r, label in zip(predicted, truth))
    # what ran: predict's last stderr line ends with it (a variant this CPU cannot run falls back)
    figures = {"ran": proc.stderr.split()[-1], "images": len(results), "accuracy": round(correct / len(results), 4)}
    if len(classes) == 2:  # P(second class) follows from the confidence of the predicted one
        second = classes[1]
        p_second = [r["confidence"] if r["label"] == second else 1 - r["confidence"] for r in predicted]
        figures["log_loss"] = round(log_loss([label == second for label in truth], p_second, labels=[False, True]), 4)
    figures.update(
        errors=sum("error" in r for r in results),
        seconds=round(seconds, 1),
        images_per_second=round(len(results) / seconds, 1),
    )
    return figures


if __name__ == "__main__":
    main()
