"""The frozen backbone's features of every prepared image, through the content-addressed cache
(catdog.models.feature_cache): computed once per backbone graph, input size, precision and images,
then reused by train (``features`` mode, ``head`` mode without augmentation), evaluate (a checkpoint
whose backbone is still that graph: only the head runs) and any stage that needs embeddings.

``frozen_features`` is the entry for a stage that has no model yet (e.g. a label audit): rows in
``images.npy`` order, the manifest maps them to splits.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from catdog.core.paths import Paths
from catdog.data import integrity
from catdog.data.dataset import CachedImages, Split, make_loader
from catdog.data.transforms import eval_preset
from catdog.models.device import Runtime
from catdog.models.factory import create_model
from catdog.models.feature_cache import cached_features, feature_key, load_features
from catdog.models.frozen import FrozenPart, cached_activations, split_for_training

PRESET = "eval"  # the features are of eval_preset's images (resize, no augmentation)


def frozen_features(
    paths: Paths,
    arch: str,
    image_size: int,
    pretrained: bool,
    weights: str | None,
    runtime: Runtime,
    batch_size: int = 64,
    workers: int = 0,
) -> np.ndarray:
    """[rows of images.npy, features] float32: the pooled features of ``arch``'s frozen backbone."""
    model = runtime.prepare_model(create_model(arch, pretrained, 2, weights, image_size))
    frozen, _ = split_for_training(model, arch, image_size, "features", 0, runtime)
    return features_of(frozen, paths, batch_size, workers)


def features_of(frozen: FrozenPart, paths: Paths, batch_size: int, workers: int) -> np.ndarray:
    """The features of every row computed by ``frozen`` (the whole backbone), cached or computed now."""
    rows = _row_count(paths)

    def compute() -> np.ndarray:
        every_row = Split("all", np.arange(rows), np.zeros(rows, dtype=np.int64), [], [])
        images = CachedImages(paths, every_row, eval_preset(frozen.input_shape[-1]))
        # the loader draws its base seed from torch's global RNG: forked, so that training draws the same
        # random numbers (dropout, shuffling) whether the features were cached or computed now
        with torch.random.fork_rng(devices=[]):
            return cached_activations(frozen, make_loader(images, batch_size, workers), "frozen features")[0].numpy()

    features, from_cache = cached_features(_key(frozen, paths), rows, compute)
    tqdm.write(f"features: {rows} rows x {features.shape[1]} {'from the cache' if from_cache else 'computed, cached'}")
    return features


def cached_features_of(frozen: FrozenPart, paths: Paths) -> np.ndarray | None:
    """The cached features of ``frozen`` over every row if an earlier stage computed them, else None."""
    return load_features(_key(frozen, paths), _row_count(paths)) if frozen.whole_backbone else None


def _key(frozen: FrozenPart, paths: Paths) -> str:
    images_md5 = integrity.recorded_md5(paths, paths.images.name)
    return feature_key(frozen.graph_hash, frozen.input_shape[-1], PRESET, frozen.variant, images_md5)


def _row_count(paths: Paths) -> int:
    return int(np.load(paths.images, mmap_mode="r").shape[0])
