"""dvc.yaml declares exactly what each stage uses: a static (AST) check, no pipeline run.

For every stage ``python stages/<name>.py``:

- **code deps** = the transitive import closure of ``stages/<name>.py`` within ``src/catdog``
  (every ``import`` anywhere in a file counts, lazy ones too; importing ``catdog.a.b`` also runs
  ``catdog/__init__.py`` and ``catdog/a/__init__.py``);
- **params** = the sections of params.yaml read by the functions the stage can reach (call graph
  from the script: names and ``module.attr`` references; a referenced class brings all its
  methods). A section is read as ``params.<section>`` or ``params.flat("<section>", ...)``: by
  project convention the typed params object is always named ``params``;
- **file deps** = the ``paths.<property>`` (``catdog.core.paths.Paths``) the reachable functions use,
  that are not the stage's own outputs.

A new import, a new params section or a new file read without the matching dvc.yaml line fails
here, naming the line to add (or to remove).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest
import yaml

from catdog.core.params import Params
from catdog.core.paths import Paths

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "catdog"
SECTIONS = set(Params.model_fields)

# Functions allowed to read all of params without naming sections (the whole is not a dependency).
WHOLE_PARAMS_READERS = {
    "catdog.tracking.lineage:params_hash",  # run identity: the MLflow tag catdog.params_hash, never a DVC output
}
# Paths properties that are neither deps nor outs, on purpose.
UNDECLARED_PATHS = {
    "root",  # the project itself
    "params_file",  # DVC tracks its values as params, not the file as a dep; export logs it as lineage
    "dvc_yaml",  # the pipeline itself; export logs it as the run's lineage
    "dvc_lock",  # DVC's record of the run; export logs it, train's dataset digest reads prepare's entry
    "train_state",  # train's resumable state: deliberately not an out (see dvc.yaml)
    "variant_speed",  # export's images/s per precision: a timing, so no DVC output (git-ignored)
}
MODULE_LEVEL = "<module>"


@dataclass
class Module:
    name: str  # "catdog.pipeline.train", or "stages/train.py" for a stage script
    path: Path
    tree: ast.Module
    bindings: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # local -> (module, attr)
    imported: set[str] = field(default_factory=set)  # every catdog module this file imports

    def definitions(self) -> dict[str, ast.AST]:
        return {
            node.name: node
            for node in self.tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        }


def module_file(name: str) -> Path:
    parts = name.split(".")
    folder = REPO / "src" / Path(*parts)
    return folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")


def is_module(name: str) -> bool:
    return name.split(".")[0] == PACKAGE and module_file(name).is_file()


def parse(name: str, path: Path) -> Module:
    module = Module(name, path, ast.parse(path.read_text(), str(path)))
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if is_module(alias.name):
                    module.imported.add(alias.name)
                    if alias.asname:
                        module.bindings[alias.asname] = (alias.name, None)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and is_module(node.module):
            module.imported.add(node.module)
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if is_module(submodule):
                    module.imported.add(submodule)
                    module.bindings[alias.asname or alias.name] = (submodule, None)
                else:
                    module.bindings[alias.asname or alias.name] = (
                        node.module,
                        alias.name,
                    )
    # importing catdog.a.b runs catdog/__init__.py and catdog/a/__init__.py first
    parents = {name.rsplit(".", depth)[0] for name in module.imported for depth in range(1, name.count(".") + 1)}
    module.imported |= parents
    return module


class Closure:
    """The modules a stage script imports and the functions it can reach."""

    def __init__(self, script: Path):
        root = parse(str(script.relative_to(REPO)), script)
        self.modules = {root.name: root}
        pending = set(root.imported)
        while pending:
            name = pending.pop()
            if name not in self.modules:
                self.modules[name] = parse(name, module_file(name))
                pending |= self.modules[name].imported
        self.reached = self._reach()

    def files(self) -> set[str]:
        return {str(m.path.relative_to(REPO)) for m in self.modules.values()}

    def _reach(self) -> dict[tuple[str, str], ast.AST]:
        """(module, top-level name) -> node, for every function/class the stage can run; module-level
        code of every imported module runs at import."""
        todo = [(name, MODULE_LEVEL) for name in self.modules]
        reached: dict[tuple[str, str], ast.AST] = {}
        while todo:
            key = todo.pop()
            if key in reached:
                continue
            module = self.modules[key[0]]
            node = self._node(module, key[1])
            if node is None:  # a constant, or a name imported from another module (a package's re-export)
                target = module.bindings.get(key[1])
                if target and target[1] and target[0] in self.modules:
                    todo.append(target)
                continue
            reached[key] = node
            todo += self._references(module, node)
        return reached

    @staticmethod
    def _node(module: Module, name: str) -> ast.AST | None:
        if name == MODULE_LEVEL:
            return ast.Module(
                body=[
                    s
                    for s in module.tree.body
                    if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                ],
                type_ignores=[],
            )
        return module.definitions().get(name)

    def _references(self, module: Module, node: ast.AST) -> list[tuple[str, str]]:
        found, local = [], module.definitions()
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                if sub.id in local:
                    found.append((module.name, sub.id))
                elif sub.id in module.bindings and module.bindings[sub.id][1]:
                    found.append(module.bindings[sub.id])  # from catdog.x import f
            elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
                target = module.bindings.get(sub.value.id)
                if target and target[1] is None:
                    found.append((target[0], sub.attr))  # module.f
        return [(name, attr) for name, attr in found if name in self.modules]

    def walk(self):
        for (module, name), node in self.reached.items():
            for sub in ast.walk(node):
                yield f"{module}:{name}", sub


def is_params(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "params") or (
        isinstance(node, ast.Attribute) and node.attr == "params"
    )


def sections_read(closure: Closure) -> tuple[set[str], set[str]]:
    """(sections read, functions that read all of params without an exception)."""
    sections, whole = set(), set()
    for where, node in closure.walk():
        if isinstance(node, ast.Attribute) and node.attr in SECTIONS and is_params(node.value):
            sections.add(node.attr)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "flat"
            and is_params(node.func.value)
        ):
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            sections |= set(names)
            if not node.args and where not in WHOLE_PARAMS_READERS:
                whole.add(where)
    return sections, whole


def paths_used(closure: Closure) -> set[str]:
    """Project-relative locations from ``paths.<property>`` (and ``paths.<property> / "name"``)."""
    root = Path("/project")
    base, used = Paths(root), set()
    for _, node in closure.walk():
        if (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Div)
            and _paths_property(node.left)
            and isinstance(node.right, ast.Constant)
            and isinstance(node.right.value, str)
        ):
            used.add(f"{_paths_property(node.left)}/{node.right.value}")
        elif prop := _paths_property(node):
            used.add(prop)
    located = set()
    for entry in used:
        prop, _, name = entry.partition("/")
        if prop in UNDECLARED_PATHS or not isinstance(getattr(Paths, prop, None), property):
            continue
        location = getattr(base, prop).relative_to(root)
        located.add(str(PurePosixPath(location, name)) if name else str(PurePosixPath(location)))
    return located


def _paths_property(node: ast.AST) -> str | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "paths":
        return node.attr
    return None


def related(a: str, b: str) -> bool:
    """Equal, or one inside the other."""
    pa, pb = PurePosixPath(a), PurePosixPath(b)
    return pa == pb or pa.is_relative_to(pb) or pb.is_relative_to(pa)


def declared(stage: dict, kind: str) -> list[str]:
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in stage.get(kind) or []]


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.fixture(scope="module", params=sorted(STAGES))
def stage(request):
    name = request.param
    spec = STAGES[name]
    assert spec["cmd"] == f"python stages/{name}.py", f"{name}: expected the thin CLI stages/{name}.py"
    return name, spec, Closure(REPO / "stages" / f"{name}.py")


def test_code_deps_are_exactly_the_import_closure(stage):
    name, spec, closure = stage
    code_deps = {d for d in declared(spec, "deps") if d.endswith(".py")}
    missing, extra = (
        sorted(closure.files() - code_deps),
        sorted(code_deps - closure.files()),
    )
    assert not missing and not extra, (
        f"dvc.yaml stage {name!r} deps: add {missing}, remove {extra} "
        f"(stages/{name}.py imports exactly {sorted(closure.files())})"
    )


def test_params_are_exactly_the_sections_read(stage):
    name, spec, closure = stage
    sections, whole = sections_read(closure)
    assert not whole, (
        f"{sorted(whole)} read all of params: name the sections (params.flat('train', ...)) "
        f"or add the function to WHOLE_PARAMS_READERS with the reason"
    )
    listed = {entry if isinstance(entry, str) else next(iter(entry)) for entry in spec.get("params") or []}
    listed = {entry.split(".")[0] for entry in listed}
    missing, extra = sorted(sections - listed), sorted(listed - sections)
    assert not missing and not extra, f"dvc.yaml stage {name!r} params: add {missing}, remove {extra}"


def test_file_deps_are_exactly_the_files_read(stage):
    name, spec, closure = stage
    used = paths_used(closure)
    outputs = [o for kind in ("outs", "metrics", "plots") for o in declared(spec, kind)]
    data_deps = [d for d in declared(spec, "deps") if not d.endswith(".py") and "${" not in d]
    reads = {
        p
        for p in used
        if not any((related(p, out) and PurePosixPath(p).is_relative_to(out)) or p == out for out in outputs)
    }
    missing = sorted(
        p
        for p in reads
        if not any(related(p, dep) for dep in data_deps)
        and not any(PurePosixPath(out).is_relative_to(p) for out in outputs)
    )
    extra = sorted(dep for dep in data_deps if not any(related(dep, p) for p in used))
    assert not missing and not extra, f"dvc.yaml stage {name!r} deps: add {missing}, remove {extra}"


def test_the_analysis_sees_a_lazy_import_and_a_params_read(tmp_path):
    """Guards the checker itself: params reaches the models module only through a lazy import."""
    closure = Closure(REPO / "stages" / "train.py")
    assert "src/catdog/models/factory.py" in closure.files() and "src/catdog/__init__.py" in closure.files()
    assert {"train", "tracking"} <= sections_read(closure)[0]
    assert "data/prepared/images.npy" in paths_used(closure)
