"""The package's folders are layers: imports run one way, and only two places talk to MLflow.

A static (AST) check of every ``import`` in ``src/catdog``, lazy ones inside functions too:

    cli -> search -> pipeline -> serving -> tracking, audit, explain -> data, models -> core

A module may import its own subpackage and any layer below its own; ``data`` and ``models`` are
siblings that do not import each other, nor do ``tracking``, ``audit`` (the label-issue audit:
scikit-learn and cleanlab on features, no MLflow) and ``explain`` (the class activation maps and the
other views of a model: no MLflow in them). ``mlflow`` is imported only by ``catdog.tracking`` and by
the registered model's own file, ``catdog.serving.pyfunc``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "catdog"
LAYERS = {
    "core": 0,
    "data": 1,
    "models": 1,
    "tracking": 2,
    "audit": 2,
    "explain": 2,
    "serving": 3,
    "pipeline": 4,
    "search": 5,
    "cli": 6,
}
MLFLOW_IMPORTERS = {"catdog.serving.pyfunc"}  # besides catdog.tracking.*
# Imports against the direction, each with its reason.
ALLOWED_UPWARD = {
    # params.yaml is validated in one place before any work; the architecture names live with the
    # factory. Imported inside the validator, so loading params does not load torch.
    ("catdog.core.params", "catdog.models.architectures"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (``from a import b``: ``a``, and ``a.b`` if a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names} & MODULES.keys()  # submodules
    return found


def layer(module: str) -> str | None:
    """The layer of a catdog module (its subpackage, ``cli`` included); None for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


MODULES = {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def test_every_module_is_in_a_layer():
    unplaced = [m for m in MODULES if m != "catdog" and layer(m) not in LAYERS]
    assert not unplaced, f"modules outside the layers {sorted(LAYERS)}: {unplaced}"


def against_the_layers(module: str, path: Path) -> list[str]:
    """The catdog modules that ``module`` (in file ``path``) imports against the direction."""
    own = layer(module)
    wrong = []
    for target in imports(path):
        theirs = layer(target)
        if not target.startswith("catdog.") or theirs not in LAYERS or own is None or theirs == own:
            continue
        if LAYERS[theirs] >= LAYERS[own] and (module, target) not in ALLOWED_UPWARD:
            wrong.append(target)
    return sorted(wrong)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_one_way(module):
    wrong = against_the_layers(module, MODULES[module])
    assert not wrong, f"{module} imports {wrong}: against the layers {LAYERS}"


def test_only_tracking_and_the_registered_model_import_mlflow():
    importers = {
        module
        for module, path in MODULES.items()
        if any(name == "mlflow" or name.startswith("mlflow.") for name in imports(path))
    }
    assert importers, "the check found no mlflow import at all: it is not looking"
    assert {m for m in importers if layer(m) != "tracking"} == MLFLOW_IMPORTERS


def test_the_check_sees_a_wrong_import(tmp_path):
    """A lazy import of the pipeline from models, or of models from data, breaks the direction."""
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom catdog.core import atomic\n\ndef f():\n    from catdog.pipeline import train\n")
    assert against_the_layers("catdog.models.bad", bad) == ["catdog.pipeline", "catdog.pipeline.train"]
    bad.write_text("from catdog.models.factory import create_model\n")
    assert against_the_layers("catdog.data.bad", bad) == ["catdog.models.factory"]


def test_each_subpackage_says_what_it_owns():
    for init in PACKAGE_DIR.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc.split()) >= 25 and "TODO" not in doc, f"{init}: one paragraph on what it owns and may import"
