"""Params recipes: ``params/<name>.yaml`` holds only the keys that differ from params.yaml.

    python -m catdog.core.recipe cpu-features                 # print the command
    python -m catdog.core.recipe cpu-features --run           # run it: dvc exp run -S key=value ...
    python -m catdog.core.recipe full-gpu --run --queue -n g1 # arguments after --run go to dvc exp run

A recipe is applied as ``dvc exp run -S key=value`` for each of its keys, so DVC records every
value as a param of the experiment; params.yaml keeps the defaults. The recipe is checked
against params.yaml first: an unknown key or a bad value stops with one line. ``params/search-*.yaml``
beside them are ``catdog tune``'s search spaces, not recipes.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from catdog.core.errors import CatdogError
from catdog.core.params import load_params, parse_params
from catdog.core.paths import Paths

SEARCH_SPACE_PREFIX = "search-"  # params/search-*.yaml: catdog tune's search spaces (docs/search.md)


def recipes_dir(root: Path) -> Path:
    return root / "params"


def recipe_names(root: Path = Path(".")) -> list[str]:
    """The recipes in ``params/``, sorted (the search spaces beside them left out)."""
    return sorted(p.stem for p in recipes_dir(root).glob("*.yaml") if not p.stem.startswith(SEARCH_SPACE_PREFIX))


def overrides(name: str, root: Path = Path(".")) -> dict[str, object]:
    """The recipe's keys, flattened (``{"train.mode": "full", ...}``), validated against params.yaml."""
    path = recipes_dir(root) / f"{name}.yaml"
    if not path.is_file() or name.startswith(SEARCH_SPACE_PREFIX):
        known = recipe_names(root)
        raise CatdogError(f"no recipe {name!r} ({path}); known: {', '.join(known) or 'none'}")
    flat = _flatten(yaml.safe_load(path.read_text()) or {})
    defaults = load_params(Paths(root).params_file).model_dump()
    for key, value in flat.items():
        section, _, option = key.partition(".")
        defaults.setdefault(section, {})[option] = value  # parse_params names an unknown key
    parse_params(defaults, source=str(path))
    return flat


def dvc_command(flat: dict[str, object]) -> list[str]:
    return ["dvc", "exp", "run", *(arg for key, value in flat.items() for arg in ("-S", f"{key}={_dvc_value(value)}"))]


def _flatten(mapping: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _dvc_value(value: object) -> str:
    """A value in the override grammar ``dvc exp run -S`` parses (Hydra's): null, true/false, numbers."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m catdog.core.recipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="a recipe in params/, without .yaml")
    parser.add_argument(
        "--run",
        nargs=argparse.REMAINDER,
        metavar="DVC_ARGS",
        help="run the command; arguments after it go to dvc exp run (e.g. --queue -n NAME)",
    )
    args = parser.parse_args(argv)
    try:
        command = dvc_command(overrides(args.name))
    except CatdogError as exc:
        print(f"recipe: error: {exc}", file=sys.stderr)
        return 2
    if args.run is None:
        print(shlex.join(command))
        return 0
    return subprocess.run([*command, *args.run]).returncode


if __name__ == "__main__":
    sys.exit(main())
