"""catdog.core.paths.Paths and dvc.yaml name the same files: every file a stage declares is a Paths
property, and every Paths file is in dvc.yaml or listed below with the reason it is not."""

from __future__ import annotations

from pathlib import PurePosixPath

import yaml

from catdog.core.paths import Paths

from conftest import REPO_ROOT
from test_lineage import UNDECLARED_PATHS

# Paths properties that are deliberately no dep/out of a stage, each with its reason there.
NOT_DVC_FILES = UNDECLARED_PATHS - {"root"}


def paths_files() -> dict[str, str]:
    """{property name: path relative to the root} for every file or folder property of Paths."""
    paths = Paths.under("/project")
    names = [name for name, value in vars(Paths).items() if isinstance(value, property)]
    return {name: getattr(paths, name).relative_to(paths.root).as_posix() for name in names}


def dvc_files() -> dict[str, set[str]]:
    """{stage: its deps, outs, metrics and plots}, without source files and ${...} params."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    files = {}
    for name, stage in stages.items():
        entries = [
            entry if isinstance(entry, str) else next(iter(entry))
            for kind in ("deps", "outs", "metrics", "plots")
            for entry in stage.get(kind) or []
        ]
        files[name] = {entry for entry in entries if "${" not in entry and not entry.startswith(("src/", "stages/"))}
    return files


def covered(path: str, declared: set[str]) -> bool:
    """``path`` is declared, lies in a declared folder (data/prepared, models/export), or is a
    folder of declared files (reports/train)."""
    path = PurePosixPath(path)
    entries = [PurePosixPath(entry) for entry in declared]
    return any(path == entry or entry in path.parents or path in entry.parents for entry in entries)


def test_every_file_in_dvc_yaml_is_a_paths_property():
    named = set(paths_files().values())
    for stage, files in dvc_files().items():
        assert files - named == set(), f"stage {stage}: dvc.yaml names files that Paths does not"


def test_every_paths_file_is_in_dvc_yaml_or_listed_as_not():
    declared = set().union(*dvc_files().values())
    unexplained = {
        name: path for name, path in paths_files().items() if not covered(path, declared) and name not in NOT_DVC_FILES
    }
    assert unexplained == {}, "add these to dvc.yaml, or to test_lineage.UNDECLARED_PATHS with the reason"


def test_files_listed_as_not_dvc_files_are_real_and_not_declared():
    declared = set().union(*dvc_files().values())
    files = paths_files()
    assert set(files) >= NOT_DVC_FILES
    assert not {name for name in NOT_DVC_FILES if covered(files[name], declared)}


def test_paths_are_unique():
    files = list(paths_files().values())
    assert len(files) == len(set(files))
