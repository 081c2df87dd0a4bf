"""prepare.run on real zips and folders of real JPEGs."""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from catdog.core.errors import CatdogError
from catdog.core.paths import Paths
from catdog.data import decoding, integrity
from catdog.data.dataset import load_split, split_digest
from catdog.pipeline import prepare

from conftest import build_params, encode, jpeg_bytes
from image_sets import LAYOUTS, build_image_set, layout_files


def run_prepare(source: Path, root: Path, **overrides) -> tuple[dict, Paths]:
    params = build_params({"data.source": str(source), **overrides})
    paths = Paths.under(root)
    return prepare.run(params, paths), paths


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def manifest_of(paths: Paths) -> dict[str, dict[str, str]]:
    return {row["path"]: row for row in read_csv(paths.manifest)}


def rejected_of(paths: Paths) -> dict[str, str]:
    return {row["path"]: row["reason"] for row in read_csv(paths.prepared / "rejected.csv")}


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return path


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


# --- outputs and their shape ---------------------------------------------------------------------


def test_outputs_and_summary(dataset, params, paths):
    summary = prepare.run(params, paths)
    assert paths.manifest.is_file() and paths.images.is_file()
    assert (paths.prepared / "rejected.csv").is_file()
    assert not list(paths.prepared.glob("*.decoding.npy"))  # scratch file cleaned up
    assert json.loads(paths.prepare_summary.read_text()) == summary
    assert summary["images"] == 24
    assert summary["cache_size"] == 64
    assert summary["rejected"] == {} and summary["rejected_total"] == 0
    assert summary["unlabelled_ignored"] == 0
    assert summary["duplicate_groups_merged"] == 0
    images = np.load(paths.images)
    assert images.shape == (24, 64, 64, 3) and images.dtype == np.uint8
    rows = read_csv(paths.manifest)
    assert list(rows[0]) == ["path", "label", "split", "pixel_md5"]
    assert [row["path"] for row in rows] == sorted(dataset.files)  # sorted by path
    assert all(row["label"] == row["path"].split("/")[1].split(".")[0] for row in rows)


def test_stratified_split_counts(dataset, tmp_path):
    # 12 per class: round(12 * 0.15) = 2 test and 2 val per class, 8 train
    summary, paths = run_prepare(dataset.zip, tmp_path / "out")
    expected = {"train": {"cat": 8, "dog": 8}, "val": {"cat": 2, "dog": 2}, "test": {"cat": 2, "dog": 2}}
    assert summary["splits"] == expected
    counted = Counter((row["split"], row["label"]) for row in read_csv(paths.manifest))
    assert {s: {c: counted[(s, c)] for c in ("cat", "dog")} for s in expected} == expected


def test_split_counts_follow_the_fractions(make_dataset, tmp_path):
    data = make_dataset(n_per_class=20)
    summary, _ = run_prepare(data.zip, tmp_path / "out", **{"data.val_fraction": 0.25, "data.test_fraction": 0.1})
    assert summary["splits"] == {
        "train": {"cat": 13, "dog": 13},
        "val": {"cat": 5, "dog": 5},
        "test": {"cat": 2, "dog": 2},
    }


def test_images_row_matches_manifest_row(dataset, tmp_path):
    _, paths = run_prepare(dataset.zip, tmp_path / "out")
    images = np.load(paths.images)
    rows = read_csv(paths.manifest)
    assert len(rows) == len(images)
    for i, row in enumerate(rows):
        assert row["pixel_md5"] == hashlib.md5(images[i].tobytes()).hexdigest(), row["path"]
    # and the pixels are the decoded image: cats red, dogs blue
    for i, row in enumerate(rows):
        red, _, blue = images[i].reshape(-1, 3).mean(0)
        assert (red > blue) == (row["label"] == "cat"), row["path"]


# --- sources ---------------------------------------------------------------------------------------


def test_zip_and_folder_give_identical_manifests(dataset, tmp_path):
    _, from_zip = run_prepare(dataset.zip, tmp_path / "a")
    _, from_folder = run_prepare(dataset.folder, tmp_path / "b")
    zipped, folder = manifest_of(from_zip), manifest_of(from_folder)
    assert set(zipped) == set(dataset.files)
    assert {k: (r["label"], r["split"]) for k, r in zipped.items()} == {
        k: (r["label"], r["split"]) for k, r in folder.items()
    }
    assert from_zip.manifest.read_bytes() == from_folder.manifest.read_bytes()
    assert np.array_equal(np.load(from_zip.images), np.load(from_folder.images))


def test_relative_source_resolves_against_the_project_root(dataset, tmp_path):
    root = dataset.zip.parent.parent  # tmp_path; the zip is raw/train.zip
    summary, paths = run_prepare(Path("raw/train.zip"), root)
    assert summary["images"] == 24 and paths.manifest.is_file()


def test_missing_source_is_a_catdog_error(tmp_path):
    with pytest.raises(CatdogError, match=r"does not exist"):
        run_prepare(tmp_path / "nowhere.zip", tmp_path / "out")


def test_source_file_that_is_not_a_zip_is_a_catdog_error(tmp_path):
    bogus = tmp_path / "train.zip"
    bogus.write_text("not a zip")
    with pytest.raises(CatdogError, match=r"not a zip archive"):
        run_prepare(bogus, tmp_path / "out")


def test_class_folder_names_are_labels_as_written(tmp_path):
    folders = ["Cat", "cat", "CAT dogs", "Ünïcødé 猫"]  # four classes: no mapping, no case folding
    files = {
        f"{folder}/{i}.jpg": jpeg_bytes("cat" if n % 2 else "dog", 10 * n + i)
        for n, folder in enumerate(folders)
        for i in range(4)
    }
    summary, paths = run_prepare(write_zip(tmp_path / "pets.zip", files), tmp_path / "out")
    assert summary["layout"] == "class_folders"
    assert summary["classes"] == sorted(folders)
    assert {name: row["label"] for name, row in manifest_of(paths).items()} == {
        name: name.split("/")[0] for name in files
    }
    for name in ("train", "val", "test"):  # the labels survive manifest.csv and index the recorded classes
        split = load_split(paths, name)
        assert [split.classes[label] for label in split.labels] == [p.split("/")[0] for p in split.paths]


def test_class_subfolders_in_a_folder_are_labelled(tmp_path):
    files = {f"Cat/{i}.jpg": jpeg_bytes("cat", i) for i in range(5)}
    files.update({f"Dog/{i}.jpg": jpeg_bytes("dog", i) for i in range(5)})
    summary, paths = run_prepare(write_folder(tmp_path / "pets", files), tmp_path / "out")
    assert summary["classes"] == ["Cat", "Dog"]
    assert {name: row["label"] for name, row in manifest_of(paths).items()} == {
        name: name.split("/")[0] for name in files
    }


def test_unlabelled_files_are_ignored_and_counted(make_dataset, tmp_path):
    extra = {f"test1/{i}.jpg": jpeg_bytes("cat", 100 + i) for i in range(3)}
    extra["README.txt"] = b"the Kaggle test set has no labels\n"
    data = make_dataset(extra=extra)
    summary, paths = run_prepare(data.zip, tmp_path / "out")
    assert summary["unlabelled_ignored"] == 4
    assert summary["images"] == 24
    assert not any(name.startswith("test1/") for name in manifest_of(paths))
    assert rejected_of(paths) == {}


def test_hidden_and_macos_metadata_files_are_skipped_silently(make_dataset, tmp_path):
    extra = {
        "__MACOSX/train/._cat.0.jpg": b"\x00\x05\x16\x07 resource fork",
        "train/.cat.99.jpg": b"junk",
        ".hidden/cat.98.jpg": b"junk",
    }
    data = make_dataset(extra=extra)
    summary, paths = run_prepare(data.zip, tmp_path / "out")
    assert summary["images"] == 24
    assert summary["rejected_total"] == 0 and summary["unlabelled_ignored"] == 0
    assert set(manifest_of(paths)) == set(data.files)


def test_unsafe_zip_member_names_are_rejected(make_dataset, tmp_path):
    data = make_dataset()
    members = dict(data.files)
    evil = {
        "../evil.jpg": jpeg_bytes("cat", 50),
        "../cat.666.jpg": jpeg_bytes("cat", 51),
        "train/../../dog.667.jpg": jpeg_bytes("dog", 52),
        "/abs/cat.668.jpg": jpeg_bytes("cat", 53),
    }
    members.update(evil)
    archive = write_zip(tmp_path / "evil.zip", members)
    with zipfile.ZipFile(archive) as check:  # the names really are stored like that
        assert set(evil) <= set(check.namelist())
    summary, paths = run_prepare(archive, tmp_path / "out")
    assert rejected_of(paths) == dict.fromkeys(evil, "unsafe_path")
    assert summary["rejected"] == {"unsafe_path": 4}
    assert set(manifest_of(paths)) == set(data.files)
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "out" / "evil.jpg").exists()


# --- bad files ----------------------------------------------------------------------------------


def test_bad_files_are_skipped_and_listed(make_dataset, tmp_path):
    good = jpeg_bytes("dog", 901, size=(120, 100))
    bad = {
        "train/cat.900.jpg": b"",
        "train/dog.901.jpg": good[: len(good) // 2],
        "train/cat.902.jpg": b"<html>404 not found</html>\n",
        "train/dog.903.jpg": encode(Image.new("RGB", (20, 24), (0, 0, 255)), "JPEG"),
    }
    data = make_dataset(extra=bad)
    for source in (data.zip, data.folder):
        out = tmp_path / ("z" if source == data.zip else "f")
        summary, paths = run_prepare(source, out, **{"data.min_image_size": 32})
        assert rejected_of(paths) == {
            "train/cat.900.jpg": "empty",
            "train/dog.901.jpg": "corrupt",
            "train/cat.902.jpg": "not_an_image",
            "train/dog.903.jpg": "too_small",
        }
        assert summary["rejected"] == {"corrupt": 1, "empty": 1, "not_an_image": 1, "too_small": 1}
        assert summary["rejected_total"] == 4
        assert summary["images"] == 24
        rows = read_csv(paths.manifest)
        assert {row["path"] for row in rows} == set(data.files)
        # the cache was compacted: still row i <-> manifest row i
        images = np.load(paths.images)
        assert images.shape[0] == 24
        assert [hashlib.md5(image.tobytes()).hexdigest() for image in images] == [r["pixel_md5"] for r in rows]
        assert not list(paths.prepared.glob("*.decoding.npy"))


def test_rejected_csv_is_sorted_with_header(make_dataset, tmp_path):
    data = make_dataset(extra={"train/dog.999.jpg": b"", "train/cat.999.jpg": b""})
    _, paths = run_prepare(data.zip, tmp_path / "out")
    lines = (paths.prepared / "rejected.csv").read_text().splitlines()
    assert lines == ["path,reason", "train/cat.999.jpg,empty", "train/dog.999.jpg,empty"]


def test_too_few_images_of_a_class_stops_prepare(tmp_path):
    files = {f"train/cat.{i}.jpg": jpeg_bytes("cat", i) for i in range(8)}
    files.update({f"train/dog.{i}.jpg": jpeg_bytes("dog", i) for i in range(3)})
    with pytest.raises(CatdogError, match=r"only 3 usable 'dog' image\(s\), need data\.min_per_class=4"):
        run_prepare(write_zip(tmp_path / "few.zip", files), tmp_path / "out")


def test_rejected_files_do_not_count_towards_min_per_class(tmp_path):
    files = {f"train/cat.{i}.jpg": jpeg_bytes("cat", i) for i in range(6)}
    files.update({f"train/dog.{i}.jpg": jpeg_bytes("dog", i) for i in range(3)})
    files["train/dog.3.jpg"] = b""  # 4 dog files, 3 usable
    with pytest.raises(CatdogError, match=r"min_per_class"):
        run_prepare(write_zip(tmp_path / "few.zip", files), tmp_path / "out")


def test_every_file_bad_stops_with_a_clear_error(tmp_path):
    files = {f"Cat/{i}.jpg": b"" for i in range(4)}
    files.update({f"Dog/{i}.jpg": b"text" for i in range(4)})
    source = write_folder(tmp_path / "src", files)
    with pytest.raises(CatdogError, match=r"only 0 usable 'Cat' image\(s\), need data\.min_per_class=4"):
        run_prepare(source, tmp_path / "out")
    assert not (tmp_path / "out" / "data" / "prepared").exists()  # nothing half-written


def test_no_labelled_images_is_a_catdog_error(tmp_path):
    source = write_folder(tmp_path / "src", {"1.jpg": jpeg_bytes("cat", 1), "README.txt": b"no labels here"})
    with pytest.raises(CatdogError, match=r"no labelled images in .* expected <class>\.<n>\.jpg names"):
        run_prepare(source, tmp_path / "out")


# --- duplicates ---------------------------------------------------------------------------------


def test_duplicates_land_in_one_split(make_dataset, tmp_path):
    copies = {
        "train/cat.100.jpg": "train/cat.0.jpg",
        "train/cat.101.jpg": "train/cat.1.jpg",
        "train/cat.102.jpg": "train/cat.2.jpg",
        "train/dog.100.jpg": "train/dog.0.jpg",
        "train/dog.101.jpg": "train/dog.1.jpg",
        "train/dog.102.jpg": "train/dog.2.jpg",
    }
    base = make_dataset(name="base")
    data = make_dataset(extra={copy: base.files[original] for copy, original in copies.items()})
    summary, paths = run_prepare(data.zip, tmp_path / "out")
    manifest = manifest_of(paths)
    assert summary["images"] == 30  # duplicates are kept, only grouped
    assert summary["duplicate_groups_merged"] == 6
    for copy, original in copies.items():
        assert manifest[copy]["pixel_md5"] == manifest[original]["pixel_md5"]
        assert manifest[copy]["split"] == manifest[original]["split"], copy
    # groups, not images, are stratified: 12 groups per class -> 2 test groups, 2 val groups
    for label in ("cat", "dog"):
        groups = {(row["pixel_md5"], row["split"]) for row in manifest.values() if row["label"] == label}
        assert Counter(split for _, split in groups) == {"train": 8, "val": 2, "test": 2}


# --- determinism ---------------------------------------------------------------------------------


def test_two_runs_are_byte_identical(dataset, tmp_path):
    _, first = run_prepare(dataset.zip, tmp_path / "a")
    _, second = run_prepare(dataset.zip, tmp_path / "b")
    assert first.manifest.read_bytes() == second.manifest.read_bytes()
    assert first.images.read_bytes() == second.images.read_bytes()
    assert first.prepare_summary.read_bytes() == second.prepare_summary.read_bytes()


def test_worker_count_does_not_change_the_outputs(make_dataset, tmp_path):
    data = make_dataset(extra={"train/cat.900.jpg": b"", "train/dog.901.jpg": b"nope"})
    _, one = run_prepare(data.zip, tmp_path / "w1", **{"data.workers": 1})
    _, two = run_prepare(data.zip, tmp_path / "w2", **{"data.workers": 2})
    assert one.manifest.read_bytes() == two.manifest.read_bytes()
    assert one.images.read_bytes() == two.images.read_bytes()
    assert (one.prepared / "rejected.csv").read_bytes() == (two.prepared / "rejected.csv").read_bytes()


def test_split_does_not_depend_on_listing_order(dataset, tmp_path):
    reversed_zip = write_zip(tmp_path / "reversed.zip", dict(reversed(list(dataset.files.items()))))
    _, forward = run_prepare(dataset.zip, tmp_path / "a")
    _, backward = run_prepare(reversed_zip, tmp_path / "b")
    assert forward.manifest.read_bytes() == backward.manifest.read_bytes()


def test_seed_changes_the_split(dataset, tmp_path):
    _, seed42 = run_prepare(dataset.zip, tmp_path / "a", **{"data.seed": 42})
    _, seed7 = run_prepare(dataset.zip, tmp_path / "b", **{"data.seed": 7})
    splits42 = {k: r["split"] for k, r in manifest_of(seed42).items()}
    splits7 = {k: r["split"] for k, r in manifest_of(seed7).items()}
    assert splits42.keys() == splits7.keys()
    assert splits42 != splits7
    assert Counter(splits42.values()) == Counter(splits7.values())  # same stratified counts


def test_the_test_splits_digest_names_its_images_whatever_their_cached_size(dataset, tmp_path):
    """Export compares test accuracies only between versions scored on the same test images."""
    _, small = run_prepare(dataset.zip, tmp_path / "a", **{"data.seed": 42, "data.cache_size": 64})
    _, large = run_prepare(dataset.zip, tmp_path / "b", **{"data.seed": 42, "data.cache_size": 96})
    _, reseeded = run_prepare(dataset.zip, tmp_path / "c", **{"data.seed": 7, "data.cache_size": 64})
    small_test, large_test, reseeded_test = (load_split(paths, "test") for paths in (small, large, reseeded))
    assert split_digest(small_test) == split_digest(large_test)
    assert split_digest(reseeded_test) != split_digest(small_test)
    assert split_digest(load_split(small, "val")) != split_digest(small_test)


def test_limit_per_class_is_seeded(make_dataset, tmp_path):
    data = make_dataset(n_per_class=12)
    first, a = run_prepare(data.zip, tmp_path / "a", **{"data.limit_per_class": 5})
    _, b = run_prepare(data.zip, tmp_path / "b", **{"data.limit_per_class": 5})
    assert first["images"] == 10
    assert Counter(row["label"] for row in read_csv(a.manifest)) == {"cat": 5, "dog": 5}
    assert a.manifest.read_bytes() == b.manifest.read_bytes()


def test_rerun_replaces_stale_outputs(dataset, tmp_path):
    _, paths = run_prepare(dataset.zip, tmp_path / "out")
    stale = paths.prepared / "stale.npy"
    stale.write_bytes(b"old")
    run_prepare(dataset.zip, tmp_path / "out")
    assert not stale.exists()
    assert paths.manifest.is_file()


# --- the stage entry point dvc.yaml runs --------------------------------------------------------


def test_stage_cli_runs_and_prints_the_summary(dataset, tmp_path, capsys):
    from catdog.pipeline.stage import main

    params_file = tmp_path / "params.yaml"
    raw = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    raw["data"].update({"source": str(dataset.zip), "cache_size": 32, "min_per_class": 4, "workers": 1})
    params_file.write_text(yaml.safe_dump(raw))
    main("prepare", prepare.run, ["--params", str(params_file), "--root", str(tmp_path / "project")])
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert (
        out.startswith("prepare: ") and ", images 24, " in out
    )  # the summary line (catdog.pipeline.stage.summary_line)
    assert (tmp_path / "project" / "data" / "prepared" / "manifest.csv").is_file()


@pytest.mark.parametrize("problem", ["bad_param", "missing_source"])
def test_stage_cli_reports_errors_in_one_line(tmp_path, capsys, problem):
    from catdog.pipeline.stage import main

    raw = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    raw["data"]["source"] = str(tmp_path / "missing.zip")
    if problem == "bad_param":
        raw["data"]["cache_sise"] = 64
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as info:
        main("prepare", prepare.run, ["--params", str(params_file), "--root", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prepare: error: ")
    assert ("unknown key data.cache_sise" if problem == "bad_param" else "does not exist") in err[0]
    assert not (tmp_path / "data" / "prepared").exists()  # nothing written before validation passed


# --- layouts: any labelled image set (tests/image_sets.py) ---------------------------------------

CLASSES = ["Golden Retriever", "cat", "Élan"]  # a space, a capital, a non-ASCII letter; sorted as given


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_its_classes_labels_and_the_same_manifest_from_zip_or_folder(tmp_path, layout):
    folder = build_image_set(tmp_path / "set", layout, CLASSES, 9)
    zipped = build_image_set(tmp_path / "zipped", layout, CLASSES, 9, as_zip=True)
    summaries, manifests = [], []
    for images in (folder, zipped):
        summary, paths = run_prepare(images.source, tmp_path / f"out-{images.source.name}", **images.params)
        summaries.append(summary)
        manifests.append(paths.manifest.read_bytes())
        manifest = manifest_of(paths)
        assert {name: row["label"] for name, row in manifest.items()} == images.labels
        if images.splits:
            assert {name: row["split"] for name, row in manifest.items()} == images.splits
        split = load_split(paths, "test")
        assert split.classes == CLASSES
        assert [split.classes[label] for label in split.labels] == [images.labels[path] for path in split.paths]
    assert summaries[0] == summaries[1] and manifests[0] == manifests[1]
    summary = summaries[0]
    assert summary["layout"] == layout and summary["classes"] == CLASSES
    assert summary["images"] == 27 and summary["rejected_total"] == 0 and summary["unlabelled_ignored"] == 0
    expected = {"train": 3, "val": 3, "test": 3} if layout == "split_folders" else {"train": 7, "val": 1, "test": 1}
    assert summary["splits"] == {name: dict.fromkeys(CLASSES, n) for name, n in expected.items()}
    assert (
        json.loads(Path(tmp_path / "out-set" / "data" / "prepared" / "content.json").read_text())["classes"] == CLASSES
    )


def test_the_layout_is_printed_in_one_line(tmp_path, capsys):
    images = build_image_set(tmp_path / "set", "split_folders", CLASSES, 6, splits=("train", "test"))
    run_prepare(images.source, tmp_path / "out")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("layout: ")]
    assert lines == [
        "layout: split_folders (labels from class folders; given splits: train, test; val carved from train/); "
        "classes: Golden Retriever, cat, Élan"
    ]


def test_kaggle_names_work_for_any_class_and_unlabelled_folders_beside_them_are_ignored(tmp_path):
    files, labels, _ = layout_files("kaggle_names", ["bird", "cat", "dog"], 5)
    files.update({f"test1/{i}.jpg": data for i, data in enumerate(list(files.values())[:3])})
    summary, paths = run_prepare(write_zip(tmp_path / "train.zip", files), tmp_path / "out")
    assert summary["layout"] == "kaggle_names" and summary["classes"] == ["bird", "cat", "dog"]
    assert summary["unlabelled_ignored"] == 3
    assert {name: row["label"] for name, row in manifest_of(paths).items()} == labels


def test_kaggle_named_files_in_class_folders_are_labelled_by_their_folder(tmp_path):
    # cat.N.jpg in one class folder only: not Kaggle's layout (one folder must hold every such name, of two classes)
    files = {f"Cat/cat.{i}.jpg": jpeg_bytes("cat", i) for i in range(4)}
    files.update({f"Dog/IMG_{i}.jpg": jpeg_bytes("dog", i) for i in range(4)})
    summary, _ = run_prepare(write_zip(tmp_path / "pets.zip", files), tmp_path / "out")
    assert summary["layout"] == "class_folders" and summary["classes"] == ["Cat", "Dog"]


def test_a_folder_holding_every_image_is_descended_and_subfolders_belong_to_their_class(tmp_path):
    files = {f"PetImages/Cat/{i}.jpg": jpeg_bytes("cat", i) for i in range(4)}
    files.update({f"PetImages/Dog/{i}.jpg": jpeg_bytes("dog", i) for i in range(3)})
    files["PetImages/Dog/puppies/0.jpg"] = jpeg_bytes("dog", 50)  # ImageFolder: still a Dog
    files["PetImages/loose.jpg"] = jpeg_bytes("dog", 51)  # in no class folder: ignored
    files["readme[1].txt"] = b"Microsoft's PetImages"
    summary, paths = run_prepare(write_folder(tmp_path / "src", files), tmp_path / "out")
    assert summary["layout"] == "class_folders" and summary["classes"] == ["Cat", "Dog"]
    assert manifest_of(paths)["PetImages/Dog/puppies/0.jpg"]["label"] == "Dog"
    assert summary["unlabelled_ignored"] == 2
    assert "PetImages/loose.jpg" not in manifest_of(paths)


def test_split_folders_carve_a_missing_split_from_train_stratified(tmp_path):
    files, _, given = layout_files("split_folders", ["a", "b", "c"], 40, splits=("train", "train", "val"))
    summary, paths = run_prepare(write_folder(tmp_path / "src", files), tmp_path / "out")
    manifest = manifest_of(paths)
    assert all(manifest[name]["split"] == "val" for name, split in given.items() if split == "val")
    # 27 or 26 train images per class; round(26.x * 0.15) = 4 of each carved into test
    assert summary["splits"]["test"] == {"a": 4, "b": 4, "c": 4}
    assert all(given[name] == "train" for name, row in manifest.items() if row["split"] == "test")
    assert summary["splits"]["val"] == {label: sum(1 for n in given.values() if n == "val") // 3 for label in "abc"}


def test_only_train_is_class_folders_under_train_with_both_splits_carved(tmp_path):
    files, _, _ = layout_files("split_folders", ["a", "b"], 10, splits=("train",))
    summary, _ = run_prepare(write_folder(tmp_path / "src", files), tmp_path / "out")
    assert summary["layout"] == "class_folders"
    assert summary["splits"]["train"] == {"a": 6, "b": 6} and summary["splits"]["test"] == {"a": 2, "b": 2}


def test_an_unlabelled_test_folder_is_ignored_and_test_carved_from_train(tmp_path):
    files, _, _ = layout_files("split_folders", ["a", "b"], 10, splits=("train", "val"))
    files.update({f"test/{i}.jpg": jpeg_bytes("cat", 200 + i) for i in range(5)})  # a competition's test set
    summary, _ = run_prepare(write_folder(tmp_path / "src", files), tmp_path / "out")
    assert summary["layout"] == "split_folders" and summary["unlabelled_ignored"] == 5
    assert summary["splits"]["val"] == {"a": 5, "b": 5} and summary["splits"]["test"] == {"a": 1, "b": 1}


def test_split_folders_of_kaggle_names(tmp_path):
    files = {
        f"{split}/{label}.{i}.jpg": jpeg_bytes(label, i)
        for label in ("cat", "dog")
        for i, split in enumerate(["train"] * 6 + ["val"] * 2)
    }
    summary, paths = run_prepare(write_zip(tmp_path / "pre.zip", files), tmp_path / "out")
    assert summary["layout"] == "split_kaggle_names"
    assert summary["splits"]["val"] == {"cat": 2, "dog": 2} and summary["splits"]["test"] == {"cat": 1, "dog": 1}
    assert {row["label"] for row in manifest_of(paths).values()} == {"cat", "dog"}


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"dog/9.jpg": "dog"}, r"top folders \['dog', 'test', 'train', 'val'\] mix split folders"),
        (
            {"val/cat.1.jpg": "cat", "val/dog.1.jpg": "dog"},
            r"<class>\.<n>\.<ext> names in val/ and split_folders \(labels from class folders; .*\) beside them",
        ),
        (
            {"val/cat.1.jpg": "cat", "val/dog.1.jpg": "dog", "test/cat.1.jpg": "cat", "test/dog.1.jpg": "dog"},
            r"some split folders hold <class>/ folders, others <class>\.<n>\.jpg names",
        ),
    ],
)
def test_ambiguous_layouts_say_what_was_found(tmp_path, extra, message):
    files, _, _ = layout_files("split_folders", ["cat", "dog"], 9)
    files.update({name: jpeg_bytes(label, 300) for name, label in extra.items()})
    with pytest.raises(CatdogError, match=r"ambiguous layout in data\.source: " + message):
        run_prepare(write_folder(tmp_path / "src", files), tmp_path / "out")
    assert not (tmp_path / "out" / "data").exists()


def test_split_folders_without_train_are_an_error(tmp_path):
    files, _, _ = layout_files("split_folders", ["cat", "dog"], 6, splits=("val", "test"))
    with pytest.raises(CatdogError, match=r"top folders \['test', 'val'\] have no train/"):
        run_prepare(write_folder(tmp_path / "src", files), tmp_path / "out")


def test_a_given_split_without_a_class_is_an_error(tmp_path):
    files, _, _ = layout_files("split_folders", ["cat", "dog"], 9)
    for name in [n for n in files if n.startswith("val/dog/")]:
        del files[name]
    with pytest.raises(CatdogError, match=r"the given val/ folder has no usable 'dog' image: add some, or leave val/"):
        run_prepare(write_folder(tmp_path / "src", files), tmp_path / "out")


def test_a_copy_in_val_or_test_of_a_train_image_is_rejected_and_the_train_copy_kept(tmp_path):
    files, _, given = layout_files("split_folders", ["cat", "dog"], 12)
    train_image = next(name for name, split in given.items() if split == "train")
    label = train_image.split("/")[1]
    files[f"val/{label}/copy.jpg"] = files[f"test/{label}/copy.jpg"] = files[train_image]
    summary, paths = run_prepare(write_folder(tmp_path / "src", files), tmp_path / "out")
    assert rejected_of(paths) == {
        f"val/{label}/copy.jpg": "duplicate_across_splits",
        f"test/{label}/copy.jpg": "duplicate_across_splits",
    }
    assert manifest_of(paths)[train_image]["split"] == "train"
    assert summary["splits"]["val"] == {"cat": 4, "dog": 4}


# --- CSV labels ------------------------------------------------------------------------------------


def test_csv_rows_without_their_file_are_rejected_and_the_rest_used(tmp_path):
    files, labels, _ = layout_files("csv", ["cat", "dog", "owl"], 6)
    extra_rows = '"images/gone.jpg",owl\n"./images/0-0.jpg",cat\n../outside.jpg,cat\n\n'
    files["labels.csv"] += extra_rows.encode()
    files["images/not-listed.jpg"] = jpeg_bytes("cat", 99)
    files["notes.txt"] = b"not an image, not listed"
    for source in (write_folder(tmp_path / "src", files), write_zip(tmp_path / "src.zip", files)):
        summary, paths = run_prepare(source, tmp_path / f"out-{source.name}", **{"data.labels": "labels.csv"})
        assert summary["layout"] == "csv"
        assert rejected_of(paths) == {"images/gone.jpg": "missing_file", "../outside.jpg": "unsafe_path"}
        assert {name: row["label"] for name, row in manifest_of(paths).items()} == labels
        assert summary["unlabelled_ignored"] == 2  # not-listed.jpg and notes.txt (labels.csv is not counted)


def test_a_csv_path_under_two_labels_is_conflicting(tmp_path):
    files, labels, _ = layout_files("csv", ["cat", "dog"], 5)
    files["labels.csv"] += b"images/0-0.jpg,dog\n"
    _, paths = run_prepare(write_folder(tmp_path / "src", files), tmp_path / "out", **{"data.labels": "labels.csv"})
    assert rejected_of(paths) == {"images/0-0.jpg": "conflicting_labels"}
    assert set(manifest_of(paths)) == set(labels) - {"images/0-0.jpg"}


@pytest.mark.parametrize(
    "csv_bytes, labels_param, message",
    [
        (None, "labels.csv", r"data\.labels 'labels\.csv' is not in data\.source"),
        (b"path,label\n", "../labels.csv", r"must be a path inside data\.source"),
        (b"\xff\xfe\x00bad", "labels.csv", r"cannot be read as a UTF-8 CSV"),
        (b"path\nimages/0-0.jpg\n", "labels.csv", r"needs a header row and two columns"),
        (b"images/0-0.jpg,cat\nimages/1-0.jpg,dog\n", "labels.csv", r"first row names a file.*must be a header"),
        (b"path,label\nimages/0-0.jpg,\n", "labels.csv", r"line 2: expected path,label"),
    ],
)
def test_an_unreadable_labels_csv_stops_prepare_in_one_line(tmp_path, csv_bytes, labels_param, message):
    files, _, _ = layout_files("csv", ["cat", "dog"], 5)
    del files["labels.csv"]
    if csv_bytes is not None:
        files["labels.csv"] = csv_bytes
    with pytest.raises(CatdogError, match=message):
        run_prepare(write_folder(tmp_path / "src", files), tmp_path / "out", **{"data.labels": labels_param})
    assert not (tmp_path / "out" / "data").exists()


# --- classes --------------------------------------------------------------------------------------


def test_data_classes_fixes_the_order_and_ignores_other_classes(tmp_path):
    images = build_image_set(tmp_path / "set", "class_folders", ["bird", "cat", "dog"], 6)
    summary, paths = run_prepare(images.source, tmp_path / "out", **{"data.classes": ["dog", "cat"]})
    assert summary["classes"] == ["dog", "cat"] and integrity.recorded_classes(paths) == ["dog", "cat"]
    assert summary["other_classes_ignored"] == {"bird": 6}
    assert {row["label"] for row in manifest_of(paths).values()} == {"dog", "cat"}
    split = load_split(paths, "train")
    assert [split.classes[label] for label in split.labels] == [path.split("/")[0] for path in split.paths]
    assert list(summary["splits"]["train"]) == ["dog", "cat"]


def test_an_empty_class_folder_is_no_class_unless_data_classes_lists_it(tmp_path):
    images = build_image_set(tmp_path / "set", "class_folders", ["cat", "dog"], 5)
    (images.source / "bird").mkdir()
    summary, _ = run_prepare(images.source, tmp_path / "a")
    assert summary["classes"] == ["cat", "dog"]
    with pytest.raises(
        CatdogError, match=r"data\.classes lists 'bird' but .* has no image of it \(classes found: 'cat', 'dog'\)"
    ):
        run_prepare(images.source, tmp_path / "b", **{"data.classes": ["bird", "cat", "dog"]})


def test_one_class_is_an_error(tmp_path):
    images = build_image_set(tmp_path / "set", "class_folders", ["cat", "dog"], 5)
    shutil.rmtree(images.source / "dog")
    with pytest.raises(CatdogError, match=r"holds one class, 'cat' \(class_folders.*needs two or more"):
        run_prepare(images.source, tmp_path / "out")
    assert not (tmp_path / "out" / "data").exists()


def test_the_same_image_under_two_labels_is_rejected_everywhere(tmp_path):
    files, _, _ = layout_files("class_folders", ["cat", "dog"], 6)
    files["dog/copy-of-cat-0.jpg"] = files["cat/0.jpg"]
    summary, paths = run_prepare(write_folder(tmp_path / "src", files), tmp_path / "out")
    assert rejected_of(paths) == {"cat/0.jpg": "conflicting_labels", "dog/copy-of-cat-0.jpg": "conflicting_labels"}
    assert summary["images"] == 11 and summary["rejected"] == {"conflicting_labels": 2}


def test_a_class_below_min_per_class_is_named(tmp_path):
    files, _, _ = layout_files("class_folders", ["cat", "dog", "Snow Owl"], 6)
    files = {name: data for name, data in files.items() if not name.startswith("Snow Owl/") or name < "Snow Owl/2"}
    with pytest.raises(CatdogError, match=r"only 2 usable 'Snow Owl' image\(s\), need data\.min_per_class=4"):
        run_prepare(write_folder(tmp_path / "src", files), tmp_path / "out")


@pytest.mark.parametrize("smaller, warned", [(4, True), (5, False)])
def test_imbalance_above_three_to_one_prints_one_warning(tmp_path, capsys, smaller, warned):
    files, _, _ = layout_files("class_folders", ["cat", "dog"], 15)
    files = {
        name: data for name, data in files.items() if name.startswith("cat/") or int(name[4:].split(".")[0]) < smaller
    }
    run_prepare(write_folder(tmp_path / "src", files), tmp_path / "out")
    warnings = [line for line in capsys.readouterr().out.splitlines() if "imbalanced" in line]
    expected = f"warning: imbalanced classes: 15 'cat' vs {smaller} 'dog' images (more than 3:1)"
    assert warnings == ([f"{expected}; accuracy flatters the largest class, see balanced accuracy"] if warned else [])


# --- size limits and dying workers -----------------------------------------------------------------


def big_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    return encode(Image.fromarray(noise), "JPEG", quality=95)


def test_an_image_over_max_image_bytes_is_rejected_as_too_large_and_the_rest_kept(make_dataset, tmp_path):
    data = make_dataset(extra={"train/cat.900.jpg": big_jpeg()})
    assert len(big_jpeg()) > 50_000 > max(len(image) for image in data.files.values())
    for source in (data.zip, data.folder):
        summary, paths = run_prepare(source, tmp_path / source.name, **{"data.max_image_bytes": 50_000})
        assert rejected_of(paths) == {"train/cat.900.jpg": "too_large"}
        assert set(manifest_of(paths)) == set(data.files) and summary["rejected"] == {"too_large": 1}
    summary, _ = run_prepare(data.zip, tmp_path / "default")  # under the default cap it is an image like any
    assert summary["images"] == 25


def write_zero_member(archive: zipfile.ZipFile, name: str, size: int) -> None:
    """``size`` zero bytes, deflated (a few hundred KB on disk), streamed: never all in memory here."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with archive.open(info, "w") as stream:
        for _ in range(size >> 20):
            stream.write(bytes(1 << 20))


def lie_about_size(path: Path, name: str, declared: int) -> None:
    """Rewrite the uncompressed size the member's local and central headers declare."""
    raw = bytearray(path.read_bytes())
    encoded = name.encode()
    for signature, size_at, name_at in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
        start = raw.find(signature)
        while raw[start + name_at : start + name_at + len(encoded)] != encoded:
            start = raw.find(signature, start + 1)
        struct.pack_into("<I", raw, start + size_at, declared)
    path.write_bytes(bytes(raw))


def peak_rss_of_prepare(source: Path, root: Path, cap: int) -> tuple[dict, int]:
    """prepare.run in a fresh process (in-process decoding); its summary and peak RSS in KiB."""
    script = (
        "import json, resource, sys\n"
        "from catdog.pipeline import prepare\nfrom catdog.core.paths import Paths\nfrom conftest import build_params\n"
        f"params = build_params({{'data.source': {str(source)!r}, 'data.max_image_bytes': {cap}}})\n"
        f"summary = prepare.run(params, Paths.under({str(root)!r}))\n"
        "print(json.dumps([summary, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))\n"
    )
    path = os.pathsep.join([str(Path(prepare.__file__).parents[1]), str(Path(__file__).parent)])
    output = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    summary, peak = json.loads(output.splitlines()[-1])
    return summary, peak


@pytest.mark.slow
def test_huge_zip_members_are_never_inflated_into_memory(make_dataset, tmp_path):
    data = make_dataset()
    huge = tmp_path / "huge.zip"
    with zipfile.ZipFile(huge, "w") as archive:
        for name, image in data.files.items():
            archive.writestr(name, image)
        write_zero_member(archive, "train/cat.900.jpg", 300 << 20)  # declares its 300 MB
        write_zero_member(archive, "train/dog.900.jpg", 300 << 20)
    lie_about_size(huge, "train/dog.900.jpg", 1000)  # declares 1000 bytes, inflates to 300 MB
    with zipfile.ZipFile(huge) as archive:
        assert archive.getinfo("train/cat.900.jpg").file_size == 300 << 20
        assert archive.getinfo("train/dog.900.jpg").file_size == 1000
    assert huge.stat().st_size < 5_000_000

    cap = 1_000_000
    baseline, baseline_peak = peak_rss_of_prepare(data.zip, tmp_path / "plain", cap)
    summary, peak = peak_rss_of_prepare(huge, tmp_path / "huge", cap)
    # the honest one is refused by its declared size; zipfile stops the liar at its declared 1000 bytes,
    # where the CRC fails
    assert rejected_of(Paths.under(tmp_path / "huge")) == {
        "train/cat.900.jpg": "too_large",
        "train/dog.900.jpg": "unreadable",
    }
    assert summary["images"] == baseline["images"] == 24
    assert peak - baseline_peak < 40_000, (baseline_peak, peak)  # KiB: far below the 300 MB either inflates to


def test_a_killed_decode_worker_stops_prepare_in_one_line_naming_its_image(dataset, tmp_path, monkeypatch, capsys):
    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the decode workers inherit the patched decoder only when forked")
    from catdog.pipeline.stage import main

    victim, real_decode = dataset.files["train/dog.7.jpg"], decoding.decode_image

    def decode_or_be_killed(data, *args):
        if data == victim:
            os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
        return real_decode(data, *args)

    monkeypatch.setattr(decoding, "decode_image", decode_or_be_killed)
    raw = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    raw["data"].update({"source": str(dataset.zip), "cache_size": 32, "min_per_class": 4, "workers": 2})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as info:
        main("prepare", prepare.run, ["--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path / "project")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.strip().splitlines() if not line.startswith("decode:")] == [
        "prepare: error: a decode worker was killed while decoding train/dog.7.jpg (out of memory?): "
        "remove that file, lower data.max_image_bytes or data.workers"
    ]
    assert not (tmp_path / "project" / "data" / "prepared").exists()


# --- the user's corrections: data.exclude, data.relabel (catdog.data.corrections) -----------------


def corrections(folder: Path, exclude: str = "path\n", relabel: str = "path,label\n") -> dict[str, str]:
    """data.exclude / data.relabel overrides pointing at these CSV texts."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "exclude.csv").write_text(exclude)
    (folder / "relabel.csv").write_text(relabel)
    return {"data.exclude": str(folder / "exclude.csv"), "data.relabel": str(folder / "relabel.csv")}


def test_excluded_images_are_left_out_and_counted_and_relabelled_ones_carry_the_new_label(dataset, tmp_path):
    fixes = corrections(
        tmp_path / "fixes",
        exclude="path\ntrain/cat.0.jpg\n\ntrain/dog.3.jpg\n",  # a blank line is no row
        relabel="path,label\ntrain/cat.5.jpg,dog\n",
    )
    summary, paths = run_prepare(dataset.zip, tmp_path / "out", **fixes)
    rows = {row["path"]: row["label"] for row in read_csv(paths.manifest)}
    assert summary["excluded"] == 2 and summary["relabelled"] == 1 and summary["images"] == 22
    assert "train/cat.0.jpg" not in rows and "train/dog.3.jpg" not in rows
    assert rows["train/cat.5.jpg"] == "dog" and rows["train/cat.6.jpg"] == "cat"
    assert sum(label == "dog" for label in rows.values()) == 12  # 12 dogs - 1 excluded + 1 relabelled


def test_header_only_correction_files_change_nothing(dataset, tmp_path):
    plain, _ = run_prepare(dataset.zip, tmp_path / "plain")
    corrected, _ = run_prepare(dataset.zip, tmp_path / "corrected", **corrections(tmp_path / "fixes"))
    assert corrected == plain and plain["excluded"] == 0 and plain["relabelled"] == 0


@pytest.mark.parametrize(
    "exclude, relabel, message",
    [
        ("path\ntrain/cat.99.jpg\n", None, r"data\.exclude .* line 2: train/cat\.99\.jpg is no labelled image"),
        (None, "path,label\ntrain/cat.1.jpg,bird\n", r"line 2: 'bird' is no class of the data \(classes: cat, dog\)"),
        ("file\ntrain/cat.1.jpg\n", None, r"data\.exclude .*: the first row must be the header path"),
        (None, "path,label\ntrain/cat.1.jpg\n", r"data\.relabel .* line 2: expected path,label"),
        (
            None,
            "path,label\ntrain/cat.1.jpg,dog\ntrain/cat.1.jpg,cat\n",
            r"line 3: train/cat\.1\.jpg is relabelled twice",
        ),
        ("path\ntrain/cat.1.jpg\n", "path,label\ntrain/cat.1.jpg,dog\n", r"excluded by data\.exclude too"),
    ],
)
def test_a_bad_correction_stops_prepare_in_one_line_before_any_work(dataset, tmp_path, exclude, relabel, message):
    fixes = corrections(tmp_path / "fixes", **{k: v for k, v in (("exclude", exclude), ("relabel", relabel)) if v})
    with pytest.raises(CatdogError, match=message) as info:
        run_prepare(dataset.zip, tmp_path / "out", **fixes)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out" / "data").exists()


def test_a_missing_correction_file_corrects_nothing_and_says_so(dataset, tmp_path, capsys):
    """Outside DVC only: under `dvc repro` a missing dep stops DVC before prepare runs."""
    fixes = {**corrections(tmp_path / "fixes"), "data.relabel": str(tmp_path / "nowhere.csv")}
    summary, _ = run_prepare(dataset.zip, tmp_path / "out", **fixes)
    assert summary["relabelled"] == 0 and summary["images"] == 24
    assert f"data.relabel {tmp_path / 'nowhere.csv'} not found: no correction from it" in capsys.readouterr().out


def test_relabelling_to_a_class_of_data_classes_only(tmp_path):
    """With data.classes fixed, a new label must be one of them, even if the source has others."""
    classes, listed = ["bird", "cat", "dog"], {"data.classes": ["cat", "dog"]}
    images = build_image_set(tmp_path / "set", "class_folders", classes, 6)
    labels = layout_files("class_folders", classes, 6)[1]
    cat, bird = (next(path for path, label in sorted(labels.items()) if label == name) for name in ("cat", "bird"))
    with pytest.raises(CatdogError, match=r"'bird' is no class of the data \(classes: cat, dog\)"):
        run_prepare(
            images.source, tmp_path / "a", **listed, **corrections(tmp_path / "f1", relabel=f"path,label\n{cat},bird\n")
        )
    fixes = corrections(tmp_path / "f2", relabel=f"path,label\n{bird},cat\n")
    summary, paths = run_prepare(images.source, tmp_path / "b", **listed, **fixes)
    assert summary["relabelled"] == 1 and {r["path"]: r["label"] for r in read_csv(paths.manifest)}[bird] == "cat"
