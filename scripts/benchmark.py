"""Speed of the project's paths, each against its baseline or its limit, measured in one run.

    python scripts/benchmark.py --out reports/benchmark/benchmark.json
    python scripts/benchmark.py --images 2500 --source ../shared/data/dogs-vs-cats/train.zip

Self-contained: it extracts ``--images`` JPEGs from ``--source``, prepares them into a temporary
project, builds ``--arch`` with its pretrained weights and exports it, then measures (ratio =
project throughput / baseline throughput; ``target`` where the project promises one):

  features        frozen backbone on ONNX Runtime vs eager PyTorch, same batches
  extraction      train's feature extraction (loader + ONNX Runtime) vs raw ONNX Runtime (target 0.8)
  top_epoch       a `top` epoch on cached frozen activations vs recomputing the prefix each batch
  predict         `catdog predict` on the folder (a subprocess: start-up, decode, inference) vs the
                  exported model on ONNX Runtime alone on pre-decoded tensors (target 0.8)
  predict_naive   `catdog predict` vs PyTorch eager, one image at a time, sequential decode
  variant_<p>     each reduced-precision variant (int8; bf16 where the CPU has bf16 units) vs fp32 on
                  ONNX Runtime, on the same pre-decoded batches, in turn (catdog.pipeline.variants)
  predict_auto    `catdog predict` end to end with `--precision auto` vs `--precision fp32`, same
                  files (target 1.6 on a CPU with VNNI); its peak RSS too
  epoch           one pass over prepare's uint8 cache vs decoding every JPEG again
  prepare         prepare's parallel decode (all cores) vs one process
  audit           the label audit's own work (k-fold logistic head, cleanlab, k-NN graph) on the frozen
                  features of every prepared image, 4% of their labels flipped at random (seeded), vs
                  computing those features; the recall and precision of the flipped images are in the
                  row's label and JSON (issue 27's target: recall >= 0.9 at precision >= 0.8)
  classes_*       10 classes vs 2 (target 0.9): the same images in 10 or 2 class folders, through
                  prepare, train's extraction, and `catdog predict` with a 10- or 2-output model
  faithfulness    not a speed: the Grad-CAM maps of the model (features + logistic head fitted on the train
                  split) on the test split; the mean drop of the predicted class's probability when the 20% most
                  salient pixels are greyed vs a random 20% (ratio: salient / random; target 1: above chance)
  trial           `dvc exp run -S train.lr=0.001` vs the first `dvc repro`, on ``--trial-source``
                  (the committed sample): a trial that changes only train params (scripts/trial_benchmark.py);
                  the default head is fitted in closed form, so lr changes no weight and evaluate is skipped
  refit_trial     then `dvc exp run -S train.logistic_c=0.1` in the same project: a train-only change that
                  refits the head, so evaluate and export rerun (trial and refit_trial: at most 20 s each)
  head_trial      `dvc exp run -S train.logistic_c=0.1` vs the first `dvc repro`, on the ``--images``
                  (or ``--head-trial-images``) of ``--source`` (target 5: a head-only change on the full
                  zip in 1/5 of its first run)

Peak RSS of the benchmark process and of the predict subprocess are reported too. Prints a table
and writes every figure as JSON to ``--out`` (with the machine and the date).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import numpy as np
import psutil
import torch
import yaml
from trial_benchmark import SAMPLE, timed_trials

from catdog.audit.label_issues import audit
from catdog.core.params import load_params, parse_params
from catdog.core.paths import Paths
from catdog.data.dataset import CachedImages, Split, load_split, make_loader
from catdog.data.images import decode_image
from catdog.data.integrity import file_md5
from catdog.data.transforms import eval_preset
from catdog.explain.faithfulness import deletion_test
from catdog.models.device import resolve_runtime
from catdog.models.engine import train_one_epoch
from catdog.models.factory import create_model
from catdog.models.frozen import cached_activations, split_for_training
from catdog.models.linear_probe import fit_logistic_head
from catdog.models.onnx_runtime import export_onnx, usable_cores
from catdog.models.variants import VariantUnavailable, auto_order, open_runtime, quantize_int8
from catdog.pipeline import variants
from catdog.pipeline.audit import all_rows
from catdog.pipeline.prepare import run as prepare_run
from catdog.serving.predict import ExportedModel

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(ROOT / "data/sample/dogs-vs-cats-sample.zip"))
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--unfreeze-blocks", type=int, default=1, help="top_epoch: blocks that train")
    parser.add_argument(
        "--model-images",
        type=int,
        default=512,
        help="features, extraction, top_epoch, predict_naive: at most this many images",
    )
    parser.add_argument("--trial-source", default=str(SAMPLE), help="trial: the images of its DVC project")
    parser.add_argument(
        "--skip-trials", action="store_true", help="leave out trial, refit_trial and head_trial (5 dvc runs)"
    )
    parser.add_argument(
        "--head-trial-images", type=int, help="head_trial: this many of --source's images (default --images)"
    )
    parser.add_argument("--audit-images", type=int, help="audit: this many of --source's images (default --images)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--markdown", type=Path, metavar="JSON", help="measure nothing: print the docs' table of this report"
    )
    args = parser.parse_args(argv)
    if args.markdown:
        report = json.loads(args.markdown.read_text())
        print(markdown_table(report))
        return report

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = extract_images(Path(args.source), args.images, tmp / "images")
        files = sorted(folder.iterdir())
        prepared, prepare_result = bench_prepare(folder, tmp, args.image_size)
        model = create_model(args.arch, pretrained=args.arch != "simple_cnn", image_size=args.image_size).eval()
        classes = load_split(prepared, "train").classes
        export_dir = export_model(model, classes, args.image_size, prepared.exported)
        results = [
            bench_features(model, args, prepared),
            bench_extraction(model, args, prepared),
            bench_top_epoch(model, args, prepared),
            *bench_predict(export_dir, folder, files, model, args.image_size, args.model_images),
            *bench_variants(prepared, args, folder, files),
            bench_epoch(prepared, files),
            prepare_result,
            bench_audit(model, args, audit_images(prepared, args, tmp)),
            *bench_classes(files, args, tmp / "classes"),
            bench_faithfulness(model, args, prepared),
            *([] if args.skip_trials else bench_trials(folder, args, tmp / "trials")),
        ]
    report = {
        "machine": machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {k: str(v) for k, v in vars(args).items()},
        "results": results,
        "peak_rss_mb": peak_rss_mb(resource.RUSAGE_SELF),
    }
    print_table(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def extract_images(source: Path, count: int, folder: Path) -> Path:
    """The first ``count`` JPEGs of a Kaggle-named zip (``<class>.<n>.jpg``, the classes alternating),
    as files in ``folder``."""
    folder.mkdir(parents=True)
    with zipfile.ZipFile(source) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".jpg"))
        by_class: dict[str, list[str]] = {}
        for name in names:
            by_class.setdefault(PurePosixPath(name).name.split(".")[0], []).append(name)
        chosen = [n for group in zip(*by_class.values()) for n in group][:count]
        for name in chosen:
            (folder / PurePosixPath(name).name).write_bytes(archive.read(name))
    return folder


def timed_prepare(source: Path, root: Path, size: int, workers: int = 0) -> float:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(source=str(source), workers=workers, cache_size=size, min_per_class=3)
    started = time.perf_counter()
    prepare_run(parse_params(raw), Paths.under(root))
    return time.perf_counter() - started


def bench_prepare(folder: Path, tmp: Path, size: int) -> tuple[Paths, dict]:
    parallel_s, single_s = (timed_prepare(folder, tmp / f"workers{w}", size, w) for w in (0, 1))
    count = len(list(folder.iterdir()))
    return Paths.under(tmp / "workers0"), comparison(
        "prepare", "parallel decode (all cores)", parallel_s, "one process", single_s, count
    )


def export_model(model, classes: list[str], image_size: int, out: Path) -> Path:
    """model.onnx + labels.json + preprocess.json, as the export stage writes them."""
    export_onnx(model, torch.rand(2, 3, image_size, image_size), out / "model.onnx", names=("image", "logits"))
    (out / "labels.json").write_text(json.dumps({"classes": classes}))
    (out / "preprocess.json").write_text(json.dumps({"cache_size": image_size, "image_size": image_size}))
    return out / "model.onnx"


def split_images(prepared: Paths, args) -> CachedImages:
    """``--model-images`` train images of the prepared cache, spread over the split (it is grouped by
    class: its first rows may all be one class, which a head cannot be fitted on)."""
    train = load_split(prepared, "train")
    picks = np.unique(np.linspace(0, len(train.rows) - 1, min(len(train.rows), args.model_images)).astype(int))
    spread = Split(train.name, train.rows[picks], train.labels[picks], [train.paths[i] for i in picks], train.classes)
    return CachedImages(prepared, spread, eval_preset(args.image_size))


def stacked_batches(images: CachedImages, batch_size: int) -> list[torch.Tensor]:
    tensors = torch.stack([images[i][0] for i in range(len(images))])
    return list(torch.split(tensors, batch_size))


def bench_features(model, args, prepared: Paths) -> dict:
    frozen, _ = split_for_training(model, args.arch, args.image_size, "features", 0, resolve_runtime())
    batches = stacked_batches(split_images(prepared, args), args.batch_size)
    count = sum(len(b) for b in batches)
    frozen(batches[0])  # warm-up at full batch size: first-run allocations
    with torch.inference_mode():
        ort_s = timed(lambda: [frozen(b) for b in batches])
        eager_s = timed(lambda: [model.embed(b) for b in batches])
    return comparison("features", "frozen backbone on ONNX Runtime", ort_s, "eager PyTorch fp32", eager_s, count)


def timed_extraction(frozen, images: CachedImages, batch_size: int) -> float:
    """train's `features` mode: a DataLoader over the cache into the frozen part on ONNX Runtime."""
    loader = make_loader(images, batch_size, 0)
    return timed(lambda: cached_activations(frozen, loader, desc="benchmark extraction"))


def bench_extraction(model, args, prepared: Paths) -> dict:
    """What train's `features` mode does (DataLoader over the cache + ONNX Runtime) vs the raw
    ONNX Runtime throughput on the same, already stacked tensors."""
    frozen, _ = split_for_training(model, args.arch, args.image_size, "features", 0, resolve_runtime())
    images = split_images(prepared, args)
    batches = stacked_batches(images, args.batch_size)
    frozen(batches[0])  # warm-up, as above
    raw_s = timed(lambda: [frozen(b) for b in batches])
    stage_s = timed_extraction(frozen, images, args.batch_size)
    return comparison(
        "extraction",
        "train's feature extraction (loader + ONNX Runtime)",
        stage_s,
        "raw ONNX Runtime on stacked tensors",
        raw_s,
        len(images),
        target=0.8,
    )


def audit_images(prepared: Paths, args, tmp: Path) -> Paths:
    """The audit row's images: --images' own, or --audit-images of --source prepared apart (the issue's
    figure is on the whole zip)."""
    if args.audit_images in (None, args.images):
        return prepared
    folder = extract_images(Path(args.source), args.audit_images, tmp / "audit-images")
    timed_prepare(folder, tmp / "audit", args.image_size)
    return Paths.under(tmp / "audit")


def bench_audit(model, args, prepared: Paths, flipped_share: float = 0.04) -> dict:
    """The audit (params.yaml's folds, C, filter) on every prepared image with 4% of the labels flipped
    to another class at random, vs the frozen features it reads (train computes those anyway)."""
    everything, _ = all_rows(prepared)
    frozen, _ = split_for_training(model, args.arch, args.image_size, "features", 0, resolve_runtime())
    loader = make_loader(CachedImages(prepared, everything, eval_preset(args.image_size)), args.batch_size, 0)
    started = time.perf_counter()
    features = cached_activations(frozen, loader, desc="benchmark audit features")[0].numpy()
    extraction_s = time.perf_counter() - started
    rng, n_classes = np.random.default_rng(0), len(everything.classes)
    flipped = rng.choice(len(features), round(flipped_share * len(features)), replace=False)
    labels = everything.labels.copy()
    labels[flipped] = (labels[flipped] + rng.integers(1, n_classes, len(flipped))) % n_classes
    a = load_params(ROOT / "params.yaml").audit
    started = time.perf_counter()
    findings = audit(features, labels, everything.classes, a.folds, a.c, a.filter_by, a.seed)
    audit_s = time.perf_counter() - started
    found = int(np.isin(findings.issues, flipped).sum())
    recall, precision = found / len(flipped), found / max(len(findings.issues), 1)
    row = comparison(
        "audit",
        f"audit: {a.folds}-fold head + cleanlab + k-NN ({flipped_share:.0%} flipped: recall {recall:.2f}, "
        f"precision {precision:.2f})",
        audit_s,
        "the frozen features it reads",
        extraction_s,
        len(features),
    )
    return {**row, "flipped": len(flipped), "flagged": len(findings.issues), "recall": recall, "precision": precision}


def bench_top_epoch(model, args, prepared: Paths) -> dict:
    """One `top` epoch (last blocks + head train) on cached prefix activations vs recomputing the
    prefix on ONNX Runtime for every batch; the prefix is computed once in the cached case (timed too)."""
    runtime = resolve_runtime()
    model.freeze_backbone(except_last=args.unfreeze_blocks)
    frozen, rest = split_for_training(model, args.arch, args.image_size, "top", args.unfreeze_blocks, runtime)
    images = split_images(prepared, args)
    optimizer = torch.optim.SGD([w for w in rest.parameters() if w.requires_grad], lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def epoch(module, loader):
        train_one_epoch(module, loader, optimizer, scheduler, runtime, None, desc="benchmark top epoch")

    image_loader = make_loader(images, args.batch_size, 0)
    recomputed_s = timed(lambda: epoch(torch.nn.Sequential(frozen, rest), image_loader))
    started = time.perf_counter()
    activations, labels = cached_activations(frozen, image_loader, desc="benchmark prefix")
    prefix_s = time.perf_counter() - started
    cached_loader = make_loader(torch.utils.data.TensorDataset(activations, labels), args.batch_size, 0)
    cached_s = timed(lambda: epoch(rest, cached_loader))
    model.unfreeze_backbone()
    result = comparison(
        "top_epoch",
        "epoch on cached prefix activations",
        cached_s,
        "epoch recomputing the prefix",
        recomputed_s,
        len(images),
    )
    return {**result, "prefix_once_s": round(prefix_s, 3)}


def timed_predict(model_file: Path, folder: Path, expected: int, precision: str = "fp32") -> tuple[float, float]:
    """Seconds of a `catdog predict` subprocess on ``folder`` (start-up and model load included), peak RSS MB."""
    command = [str(Path(sys.executable).parent / "catdog"), "predict", str(folder), "--model", str(model_file)]
    started = time.perf_counter()
    process = subprocess.Popen(
        [*command, "--precision", precision],
        stdout=subprocess.PIPE,
        text=True,
    )
    predict_rss = PeakRss(process.pid)  # polled: a child's ru_maxrss starts at this big process's size
    out = process.stdout.read()
    status = process.wait()
    seconds = time.perf_counter() - started
    if status != 0 or len(out.splitlines()) != expected:
        raise RuntimeError(f"catdog predict failed (status {status}): {out[-500:]}")
    return seconds, predict_rss.stop()


def bench_predict(
    model_file: Path, folder: Path, files: list[Path], model, image_size: int, naive_images: int
) -> list[dict]:
    project_s, predict_rss = timed_predict(model_file, folder, len(files))

    exported = ExportedModel.load(model_file)
    batch = np.stack([exported.preprocess(files[i % len(files)].read_bytes()) for i in range(64)])
    exported.probabilities(batch)  # warm-up
    rounds = max(1, len(files) // len(batch))
    limit_s = timed(lambda: [exported.probabilities(batch) for _ in range(rounds)]) * len(files) / (rounds * 64)
    limit = comparison(
        "predict",
        "catdog predict (subprocess, decode overlapped)",
        project_s,
        "ONNX Runtime alone on pre-decoded tensors",
        limit_s,
        len(files),
        target=0.8,
    )

    some = files[:naive_images]  # the slow baseline on a few images: the rate is what counts
    started = time.perf_counter()
    with torch.inference_mode():
        for file in some:
            pixels = decode_image(file.read_bytes(), image_size)
            model(torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255)
    naive_s = (time.perf_counter() - started) * len(files) / len(some)
    naive = comparison(
        "predict_naive", "catdog predict", project_s, "PyTorch eager, one image at a time", naive_s, len(files)
    )
    return [{**limit, "peak_rss_mb": predict_rss}, naive]


def bench_variants(prepared: Paths, args, folder: Path, files: list[Path]) -> list[dict]:
    """int8 and (where this CPU has bf16 units) bf16 built as export builds them, each timed against fp32
    on the same batches; then `catdog predict` with auto vs fp32. Speed only: the random head's agreement
    with fp32 says nothing, so every variant built is listed in variants.json (held-out accuracy per
    variant, on a trained model: scripts/heldout_accuracy.py)."""
    images = split_images(prepared, args)
    calibration = variants.calibration_batches(prepared, args.image_size, 128)
    quantize_int8(prepared.onnx_model, prepared.int8_model, calibration)
    runtimes = {"fp32": open_runtime("fp32", prepared.onnx_model), "int8": open_runtime("int8", prepared.int8_model)}
    with contextlib.suppress(VariantUnavailable):  # no bf16 units, or OpenVINO does not compile here
        runtimes["bf16"] = open_runtime("bf16", prepared.onnx_model)
    _, per_second = variants.run_on_split(runtimes, images)
    variants.write_manifest(prepared, [name for name in runtimes if name != "fp32"])
    count, fp32_s = len(images), len(images) / per_second["fp32"]
    results = [
        comparison(f"variant_{name}", f"{name} model", count / rate, "fp32 ONNX Runtime", fp32_s, count)
        for name, rate in per_second.items()
        if name != "fp32"
    ]
    auto_s, auto_rss = timed_predict(prepared.onnx_model, folder, len(files), "auto")
    fp32_s, _ = timed_predict(prepared.onnx_model, folder, len(files), "fp32")
    auto = comparison("predict_auto", "catdog predict (auto)", auto_s, "--precision fp32", fp32_s, len(files), 1.6)
    runs = next(name for name in auto_order() if name in runtimes)
    return [*results, {**auto, "project": f"catdog predict (auto: {runs})", "peak_rss_mb": auto_rss}]


def bench_classes(files: list[Path], args, tmp: Path) -> list[dict]:
    """The same images as 10 or as 2 classes (file i in class folder ``i % n``): prepare, train's
    extraction and `catdog predict` (of all ``files``) with a model of n outputs. N classes should
    cost nothing extra."""
    # Byte-identical copies stay out of the class folders: the two copies in the first 2,500 Kaggle
    # images fall in one of 2 classes but in two of 10, where prepare rejects them as conflicting labels
    # and rewrites its cache without them (a second of copying: a cost of rejects, not of the class count).
    first_copy: dict[str, Path] = {}
    for file in files:
        first_copy.setdefault(file_md5(file), file)
    distinct = list(first_copy.values())
    seconds: dict[int, dict[str, float]] = {}
    # each twice, alternating, the faster of the two kept: a later run pays for the writeback of the
    # caches written before it (hundreds of MB), which is no cost of the class count
    for run, n in enumerate((10, 2, 10, 2)):
        source = tmp / f"{n}-classes"
        if not source.exists():
            for i, file in enumerate(distinct):
                (source / f"class {i % n}").mkdir(parents=True, exist_ok=True)
                (source / f"class {i % n}" / file.name).symlink_to(file)
        root = tmp / f"project-{run}"  # a new project each time: prepare never replaces an earlier cache
        prepare_s = timed_prepare(source, root, args.image_size)
        prepared = Paths.under(root)
        classes = load_split(prepared, "train").classes
        model = create_model(args.arch, args.arch != "simple_cnn", len(classes), image_size=args.image_size).eval()
        frozen, _ = split_for_training(model, args.arch, args.image_size, "features", 0, resolve_runtime())
        extraction_s = timed_extraction(frozen, split_images(prepared, args), args.batch_size)
        model_file = export_model(model, classes, args.image_size, tmp / f"{n}-classes-export")
        predict_s, _ = timed_predict(model_file, files[0].parent, len(files))
        measured = {"prepare": prepare_s, "extraction": extraction_s, "predict": predict_s}
        seconds[n] = {what: min(value, seconds.get(n, measured)[what]) for what, value in measured.items()}
    counts = {"prepare": len(distinct), "extraction": min(args.model_images, len(distinct)), "predict": len(files)}
    return [
        comparison(
            f"classes_{what}",
            f"{what}, 10 classes",
            seconds[10][what],
            "2 classes",
            seconds[2][what],
            counts[what],
            target=0.9,
        )
        for what in ("prepare", "extraction", "predict")
    ]


class PeakRss:
    """The highest resident set size of process ``pid``, sampled every 20 ms in a thread (MB)."""

    def __init__(self, pid: int):
        self.process, self.peak, self.running = psutil.Process(pid), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:  # exited
                return
            time.sleep(0.02)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return round(self.peak / 2**20, 1)


def bench_epoch(prepared: Paths, files: list[Path]) -> dict:
    images = np.load(prepared.images, mmap_mode="r")
    count = min(len(files), len(images))
    cached_s = timed(
        lambda: [torch.from_numpy(np.array(images[row])).permute(2, 0, 1).float().div_(255) for row in range(count)]
    )
    size = images.shape[1]
    decoded_s = timed(
        lambda: [
            torch.from_numpy(decode_image(file.read_bytes(), size)).permute(2, 0, 1).float().div_(255)
            for file in files[:count]
        ]
    )
    return comparison("epoch", "read prepare's uint8 cache", cached_s, "decode every JPEG again", decoded_s, count)


def bench_faithfulness(model, args, prepared: Paths) -> dict:
    """The deletion test of catdog.explain.faithfulness on a copy of ``model`` with a logistic head fitted on
    the train split's features; its ``project_drop``/``baseline_drop`` are probabilities, not seconds."""
    model = copy.deepcopy(model).eval()
    train = split_images(prepared, args)
    with torch.inference_mode():
        features = torch.cat([model.embed(batch) for batch in stacked_batches(train, args.batch_size)])
    fit_logistic_head(model.head, features, torch.as_tensor(train.split.labels), c=0.01)
    test = load_split(prepared, "test")
    images = CachedImages(prepared, test, eval_preset(args.image_size))
    count = min(len(images), args.model_images)
    deletion = deletion_test(model, args.arch, torch.stack([images[i][0] for i in range(count)]))
    return {
        "benchmark": "faithfulness",
        "count": count,
        "project": "grey the 20% most salient pixels (Grad-CAM)",
        "project_drop": round(deletion.salient_drop, 4),
        "baseline": "grey a random 20%",
        "baseline_drop": round(deletion.random_drop, 4),
        "ratio": round(deletion.ratio, 2),
        "target": 1.0,
    }


TRIAL_MAX_S = 20.0  # the sample's trials are held to their own wall time (issue 26): at most 20 s on 2 cores
SECONDS_TARGETS = ("trial", "refit_trial")


def bench_trials(folder: Path, args, tmp: Path) -> list[dict]:
    """A train-only trial on the sample and a head-only one on ``--source``'s images, each against
    the first `dvc repro` of its project."""
    results = []
    if args.head_trial_images not in (None, args.images):  # the issue's figure is on the whole zip
        folder = extract_images(Path(args.source), args.head_trial_images, tmp / "head-trial-images")
    for project, source, trials in (
        ("trial", Path(args.trial_source), (("trial", "train.lr=0.001"), ("refit_trial", "train.logistic_c=0.1"))),
        ("head_trial", folder, (("head_trial", "train.logistic_c=0.1"),)),
    ):
        first_s, trial_s = timed_trials(tmp / project, source, [change for _, change in trials], args)
        for (name, change), seconds in zip(trials, trial_s, strict=True):
            target = 5.0 if name == "head_trial" else None  # the others: their own seconds, TRIAL_MAX_S
            results.append(comparison(name, f"dvc exp run -S {change}", seconds, "first dvc repro", first_s, 1, target))
    return results


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _significant(seconds: float) -> float:
    return float(f"{seconds:.4g}")  # a tiny run's sub-millisecond times stay non-zero


def comparison(name, project_label, project_s, baseline_label, baseline_s, count, target=None) -> dict:
    return {
        "benchmark": name,
        "count": count,
        "project": project_label,
        "project_s": _significant(project_s),
        "project_per_s": round(count / project_s, 1),
        "baseline": baseline_label,
        "baseline_s": _significant(baseline_s),
        "baseline_per_s": round(count / baseline_s, 1),
        "ratio": round(baseline_s / project_s, 2),
        "target": target,
    }


def peak_rss_mb(who: int) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # Linux reports KiB


def machine() -> dict:
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    return {
        "cpu": cpu,
        "usable_cores": usable_cores(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def print_table(report: dict) -> None:
    print(f"{'benchmark':<14} {'project':>10} {'baseline':>11} {'ratio':>7} {'target':>7}  project vs baseline")
    for r in report["results"]:
        target = f"{r['target']:.2f}" if r["target"] else ""
        project, baseline = _figures(r)
        print(
            f"{r['benchmark']:<14} {project:>10} {baseline:>11} {r['ratio']:>7.2f} "
            f"{target:>7}  {r['project']} vs {r['baseline']}"
        )
    predict = next(r for r in report["results"] if r["benchmark"] == "predict")
    print(
        f"peak RSS: benchmark {report['peak_rss_mb']} MB, catdog predict {predict['peak_rss_mb']} MB; "
        f"{report['machine']['cpu']}, {report['machine']['usable_cores']} cores, {report['date']}"
    )


def markdown_table(report: dict) -> str:
    """The table of docs/speed.md and the README, with the machine and date of the run."""
    m = report["machine"]
    lines = [
        f"{m['cpu']}, {m['usable_cores']} cores, {report['date'][:10]}; peak RSS: benchmark "
        f"{report['peak_rss_mb']:,.0f} MB, catdog predict "
        f"{next(r for r in report['results'] if r['benchmark'] == 'predict')['peak_rss_mb']:,.0f} MB",
        "",
        "| comparison | project | baseline | ratio | target |",
        "|---|---|---|---|---|",
    ]
    for r in report["results"]:
        target = f"{r['target']:.2f}: {'met' if r['ratio'] >= r['target'] else '**not met**'}" if r["target"] else ""
        if r["benchmark"] in SECONDS_TARGETS:
            target = f"≤ {TRIAL_MAX_S:.0f} s: {'met' if r['project_s'] <= TRIAL_MAX_S else '**not met**'}"
        project, baseline = _figures(r)
        lines.append(
            f"| {r['benchmark']}: {r['project']} vs {r['baseline']} | {project} | {baseline} | {r['ratio']:.2f} "
            f"| {target} |"
        )
    return "\n".join(lines)


def _figures(result: dict) -> tuple[str, str]:
    """Throughputs (images/s), faithfulness's probability drops, or the seconds of one run (the trials)."""
    if "project_drop" in result:
        return f"-{result['project_drop']:.4f} p", f"-{result['baseline_drop']:.4f} p"
    if result["count"] == 1:
        return f"{result['project_s']:,.1f} s", f"{result['baseline_s']:,.1f} s"
    return f"{result['project_per_s']:,.1f}/s", f"{result['baseline_per_s']:,.1f}/s"


if __name__ == "__main__":
    main()
