"""prepare.run on real zips and folders of real JPEGs."""

from __future__ import annotations

import csv
import hashlib
import json
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from catdog import prepare
from catdog.data import load_split, split_digest
from catdog.errors import CatdogError
from catdog.paths import Paths

from conftest import build_params, encode, jpeg_bytes


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
    from catdog.stage import main

    params_file = tmp_path / "params.yaml"
    raw = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    raw["data"].update({"source": str(dataset.zip), "cache_size": 32, "min_per_class": 4, "workers": 1})
    params_file.write_text(yaml.safe_dump(raw))
    main("prepare", prepare.run, ["--params", str(params_file), "--root", str(tmp_path / "project")])
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith("prepare: ")
    assert json.loads(out.removeprefix("prepare: "))["images"] == 24
    assert (tmp_path / "project" / "data" / "prepared" / "manifest.csv").is_file()


@pytest.mark.parametrize("problem", ["bad_param", "missing_source"])
def test_stage_cli_reports_errors_in_one_line(tmp_path, capsys, problem):
    from catdog.stage import main

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
