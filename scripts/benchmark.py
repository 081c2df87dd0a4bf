"""Speed of the project's paths against a naive baseline, measured in one run on this machine.

    python scripts/benchmark.py                 # after `dvc repro` (needs the exported model)
    python scripts/benchmark.py --images 400 --source ../shared/data/dogs-vs-cats/train.zip

Prints one JSON object per comparison with both timings and their ratio:
  predict   `catdog predict` (ONNX Runtime, batched, threaded decode) vs PyTorch eager,
            one image at a time, sequential decode
  epoch     one pass over prepare's decoded uint8 cache vs decoding every JPEG again
  prepare   prepare's parallel decode (all cores) vs one process
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from catdog.images import decode_image
from catdog.models import load_checkpoint
from catdog.paths import Paths
from catdog.params import load_params
from catdog.prepare import run as prepare_run

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(ROOT / "data/sample/dogs-vs-cats-sample.zip"))
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    paths = Paths.under(ROOT)

    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(args.source) as archive:
        folder = Path(tmp) / "images"
        folder.mkdir()
        names = sorted(n for n in archive.namelist() if n.endswith(".jpg"))[: args.images]
        for name in names:
            (folder / PurePosixPath(name).name).write_bytes(archive.read(name))
        files = sorted(folder.iterdir())
        report(bench_predict(paths, folder, files))
        report(bench_epoch(paths, files))
        report(bench_prepare(folder, Path(tmp)))


def bench_predict(paths: Paths, folder: Path, files: list[Path]) -> dict:
    started = time.perf_counter()
    out = subprocess.run([str(Path(sys.executable).parent / "catdog"), "predict", str(folder),
                          "--model", str(paths.exported / "model.onnx")],
                         capture_output=True, text=True, check=True).stdout
    project = time.perf_counter() - started  # includes process start and model load
    assert len(out.splitlines()) == len(files)

    model, config = load_checkpoint(paths.checkpoint)
    started = time.perf_counter()
    with torch.inference_mode():
        for file in files:
            pixels = decode_image(file.read_bytes(), config["cache_size"])
            model(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255)
    naive = time.perf_counter() - started
    return comparison("predict", "catdog predict (ONNX Runtime, batched)", project,
                      "PyTorch eager, one image at a time", naive, len(files), unit="images")


def bench_epoch(paths: Paths, files: list[Path]) -> dict:
    images = np.load(paths.images, mmap_mode="r")
    count = min(len(files), len(images))
    started = time.perf_counter()
    for row in range(count):
        torch.from_numpy(np.array(images[row])).permute(2, 0, 1).float().div_(255)
    cached = time.perf_counter() - started
    size = images.shape[1]
    started = time.perf_counter()
    for file in files[:count]:
        torch.from_numpy(decode_image(file.read_bytes(), size)).permute(2, 0, 1).float().div_(255)
    decoded = time.perf_counter() - started
    return comparison("epoch", "read prepare's uint8 cache", cached, "decode every JPEG again", decoded,
                      count, unit="images")


def bench_prepare(folder: Path, tmp: Path) -> dict:
    base = load_params(ROOT / "params.yaml")
    timings = {}
    for workers in (0, 1):
        params = base.model_copy(update={"data": base.data.model_copy(update={"source": str(folder), "workers": workers})})
        started = time.perf_counter()
        prepare_run(params, Paths.under(tmp / f"workers{workers}"))
        timings[workers] = time.perf_counter() - started
    count = len(list(folder.iterdir()))
    return comparison("prepare", "parallel decode (all cores)", timings[0], "one process", timings[1], count,
                      unit="images")


def comparison(name, project_label, project_s, naive_label, naive_s, count, unit) -> dict:
    return {
        "benchmark": name,
        "project": project_label, "project_s": round(project_s, 3),
        "project_per_s": round(count / project_s, 1),
        "baseline": naive_label, "baseline_s": round(naive_s, 3),
        "baseline_per_s": round(count / naive_s, 1),
        "speedup": round(naive_s / project_s, 2), "count": count, "unit": unit,
    }


def report(result: dict) -> None:
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
