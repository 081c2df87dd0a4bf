"""Accuracy and throughput of `catdog predict` on images the pipeline never saw.

    python scripts/heldout_accuracy.py ../shared/data/dogs-vs-cats/train.zip --per-class 1000

Takes Kaggle-named images from a zip, skipping every name in the committed sample,
writes them to a temp folder and runs the real `catdog predict` CLI on it.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath

from sklearn.metrics import log_loss

SAMPLE = Path("data/sample/dogs-vs-cats-sample.zip")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zip", help="Kaggle-layout zip (cat.N.jpg / dog.N.jpg members)")
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--model", default="models/export/model.onnx")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    with zipfile.ZipFile(SAMPLE) as sample:
        seen = {PurePosixPath(n).name for n in sample.namelist()}
    with zipfile.ZipFile(args.zip) as archive, tempfile.TemporaryDirectory() as folder:
        names = sorted(n for n in archive.namelist() if n.endswith(".jpg") and PurePosixPath(n).name not in seen)
        for label in ("cat", "dog"):
            of_label = [n for n in names if PurePosixPath(n).name.startswith(f"{label}.")]
            for name in random.Random(f"{args.seed}-{label}").sample(of_label, args.per_class):
                (Path(folder) / PurePosixPath(name).name).write_bytes(archive.read(name))
        started = time.perf_counter()
        output = subprocess.run(
            ["catdog", "predict", folder, "--model", args.model], capture_output=True, text=True, check=True
        ).stdout
        seconds = time.perf_counter() - started
    results = [json.loads(line) for line in output.splitlines()]
    predicted = [r for r in results if "label" in r]
    truth = [Path(r["path"]).name.split(".")[0] for r in predicted]
    correct = sum(r["label"] == label for r, label in zip(predicted, truth))
    p_dog = [r["confidence"] if r["label"] == "dog" else 1 - r["confidence"] for r in predicted]
    print(
        json.dumps(
            {
                "images": len(results),
                "accuracy": round(correct / len(results), 4),
                "log_loss": round(log_loss([label == "dog" for label in truth], p_dog, labels=[False, True]), 4),
                "errors": sum("error" in r for r in results),
                "seconds": round(seconds, 1),
                "images_per_second": round(len(results) / seconds, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
