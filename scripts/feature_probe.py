"""How far frozen EfficientNet-Lite features go: a linear probe per backbone and per concatenation.

    python scripts/feature_probe.py ../shared/data/dogs-vs-cats/train.zip --train 4000 --test 2500

Draws ``--train`` + ``--test`` disjoint images from a Kaggle-layout zip (``<class>.<n>.jpg``, any
classes; seeded shuffle), embeds
them with each frozen backbone as train's features mode does (ONNX Runtime on a CPU), then fits what
``train.head: logistic`` fits (standardised features, L2 logistic regression) on the train part
for every combination of backbones and C, and prints test accuracy and log loss.
"""

from __future__ import annotations

import argparse
import itertools
import random
import time
import zipfile

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler

from catdog.data.images import decode_image
from catdog.data.layouts import kaggle_label
from catdog.models.device import resolve_runtime
from catdog.models.factory import create_model
from catdog.models.frozen import split_for_training

ARCHS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zip", help="Kaggle-layout zip (<class>.<n>.jpg members, e.g. cat.N.jpg / dog.N.jpg)")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=2500)
    parser.add_argument("--size", type=int, default=260, help="one input size for every backbone")
    parser.add_argument("--c", type=float, nargs="+", default=[0.003, 0.01, 0.03])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    images, labels = _images(args.zip, args.train + args.test, args.size, args.seed)
    features = {arch: _embed(arch, images, args.size) for arch in ARCHS}
    print("| backbones | C | test accuracy | test log loss |\n|---|---|---|---|")
    for count in range(1, len(ARCHS) + 1):
        for archs in itertools.combinations(ARCHS, count):
            x = np.concatenate([features[arch] for arch in archs], axis=1)
            for c in args.c:
                accuracy, loss = _probe(x, labels, args.train, c)
                name = " + ".join(arch.removeprefix("efficientnet_") for arch in archs)
                print(f"| {name} | {c} | {accuracy:.2%} | {loss:.4f} |")


def _images(zip_path: str, count: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(n for n in archive.namelist() if kaggle_label(n) is not None)
        random.Random(seed).shuffle(names)
        names = names[:count]
        images = np.stack([decode_image(archive.read(name), size) for name in names])
    classes = sorted({kaggle_label(name) for name in names})
    return images, np.array([classes.index(kaggle_label(name)) for name in names], dtype=np.int64)


@torch.inference_mode()
def _embed(arch: str, images: np.ndarray, size: int) -> np.ndarray:
    """The frozen backbone's features, as train's features mode computes them (ONNX Runtime on a CPU)."""
    runtime = resolve_runtime("fp32")
    model = runtime.prepare_model(create_model(arch, pretrained=True, image_size=size))
    frozen, _ = split_for_training(model, arch, size, "features", 0, runtime)
    started = time.perf_counter()
    batches = (torch.from_numpy(images[i : i + 64]).permute(0, 3, 1, 2) / 255 for i in range(0, len(images), 64))
    features = torch.cat([frozen(runtime.to_device(batch)).float().cpu() for batch in batches]).numpy()
    print(f"{arch}: {len(images) / (time.perf_counter() - started):.0f} img/s")
    return features


def _probe(x: np.ndarray, y: np.ndarray, train: int, c: float) -> tuple[float, float]:
    scaler = StandardScaler().fit(x[:train])
    regression = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(x[:train]), y[:train])
    probabilities = regression.predict_proba(scaler.transform(x[train:]))
    accuracy = np.mean(regression.classes_[probabilities.argmax(1)] == y[train:])
    return float(accuracy), float(log_loss(y[train:], probabilities, labels=regression.classes_))


if __name__ == "__main__":
    main()
