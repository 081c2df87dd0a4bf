"""data/prepared must be what prepare wrote: a changed or truncated cache is refused in one line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from catdog.core.errors import CatdogError
from catdog.core.paths import cache_root
from catdog.data import integrity
from catdog.pipeline import train

from conftest import REPO_ROOT, prepared_project


@pytest.fixture
def project(tmp_path, mlflow_template):
    return prepared_project(
        tmp_path / "project",
        mlflow_template,
        **{"train.mode": "full", "train.arch": "simple_cnn", "train.pretrained": False, "train.epochs": 1},
    )


def _noise_every_second_image(images_file) -> None:
    """Same shape, dtype and size: only the pixels change (the header stays valid)."""
    images = np.load(images_file, mmap_mode="r+")
    images[::2] = np.random.default_rng(0).integers(0, 256, images[::2].shape, dtype=np.uint8)
    images.flush()


def test_prepare_records_the_content_of_its_cache(project):
    paths, _ = project
    content = yaml.safe_load(paths.prepared_content.read_text())
    assert content["images.npy"]["md5"] == hashlib.md5(paths.images.read_bytes()).hexdigest()
    assert content["manifest.csv"]["bytes"] == paths.manifest.stat().st_size
    integrity.verify(paths)  # as written: accepted


@pytest.mark.parametrize("damage", ["noise", "truncate"])
def test_a_changed_or_truncated_cache_is_refused_before_training(project, damage):
    paths, params = project
    if damage == "noise":
        _noise_every_second_image(paths.images)
    else:
        with paths.images.open("r+b") as handle:
            handle.truncate(paths.images.stat().st_size // 2)
    with pytest.raises(CatdogError, match=r"dvc checkout data/prepared.*dvc repro prepare"):
        train.run(params(), paths)
    assert not paths.checkpoint.exists()


@pytest.mark.slow  # real processes: run by make test, not make check
def test_the_stage_cli_says_so_in_one_line(project):
    paths, _ = project
    with paths.images.open("r+b") as handle:
        handle.truncate(1000)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "stages" / "evaluate.py"),
            "--root",
            str(paths.root),
            "--params",
            str(REPO_ROOT / "params.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate: error: ") and "truncated" in lines[0], proc.stderr


def test_the_data_hash_follows_the_cache_not_only_the_manifest(project):
    paths, _ = project
    before = integrity.data_hash(paths)
    _noise_every_second_image(paths.images)
    integrity.record(paths, ["cat", "dog"])
    assert integrity.data_hash(paths) != before


def test_a_verified_cache_is_not_hashed_again_until_it_changes(project, monkeypatch):
    paths, _ = project
    monkeypatch.setattr(integrity, "_SETTLED_NS", 0)  # as if prepare wrote it long ago
    integrity.verify(paths)
    hash_file = integrity.file_md5

    def hashed_again(path):
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(integrity, "file_md5", hashed_again)
    integrity.verify(paths)  # the stat is unchanged: the md5 hashed the first time stands
    _noise_every_second_image(paths.images)  # same size, new pixels: a new mtime and ctime
    monkeypatch.setattr(integrity, "file_md5", hash_file)
    with pytest.raises(CatdogError, match="md5 mismatch"):
        integrity.verify(paths)


def test_a_file_written_just_now_is_not_remembered(project):
    paths, _ = project
    os.utime(paths.images)  # written just now: a write within the same timestamp tick would not show
    assert integrity.verified_md5(paths.images) == integrity.recorded_md5(paths, "images.npy")
    assert not (cache_root() / "md5").exists() or not any(
        json.loads(memo.read_text())["path"] == str(paths.images) for memo in (cache_root() / "md5").iterdir()
    )
