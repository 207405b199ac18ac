"""The package's layers, read from its imports (ast): a layer imports only layers below it.

Lowest first: the torch-only core (the modules at the top of isodiff/), the errors, the
config and command line, the run files, the model, evaluation, training (which measures
held-out L_iso as evaluation does), sweeps, analysis. An entry point loads torch, diffusers
and accelerate only after its config is valid, so that a typo's error comes in about a second.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "isodiff"
LAYERS = ("core", "errors", "config", "runs", "model", "evaluate", "train", "sweep", "analysis")
ENTRY_POINTS = (
    "isodiff.train.command",
    "isodiff.evaluate.command",
    "isodiff.sweep.command",
    "isodiff.sweep.bases",
    "isodiff.model.paper_assets",
    "isodiff.analysis.toy",
    "isodiff.analysis.tables",
    "isodiff.analysis.claims",
    "isodiff.analysis.figures",
    "isodiff.analysis.index",
    "isodiff.analysis.collect",
)
# Each takes seconds to import (torch 4 s, sklearn 3 s on a laptop CPU); numpy, pandas and
# matplotlib are left to the commands that draw tables and figures.
HEAVY = (
    "torch",
    "torchvision",
    "diffusers",
    "accelerate",
    "transformers",
    "peft",
    "lpips",
    "cleanfid",
    "sklearn",
    "scipy",
)
STDLIB = sys.stdlib_module_names
OPTIONAL_EXTRAS = ("peft",)


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 2 and (PACKAGE / f"{parts[1]}.py").is_file():
        return {"errors": "errors", "config": "config", "cli": "config"}.get(parts[1], "core")
    return "core" if len(parts) == 1 else parts[1]


def imports(path: Path, top_level_only: bool) -> list[tuple[str, int]]:
    """(module, line) of every import; top_level_only: those that run on import (not inside a
    function, not under `if TYPE_CHECKING`)."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if top_level_only and isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            ):
                continue
            if (
                top_level_only
                and isinstance(child, ast.If)
                and "TYPE_CHECKING" in ast.unparse(child.test)
            ):
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                base = child.module
                found.extend(
                    (f"{base}.{a.name}" if f"{base}.{a.name}" in ALL else base, child.lineno)
                    for a in child.names
                )
            visit(child)

    visit(tree)
    return found


ALL = modules()


def owner(name: str) -> str | None:
    """The isodiff module an import names (a.b.c -> the longest known prefix)."""
    while name and name not in ALL:
        name = name.rpartition(".")[0]
    return name or None


def test_a_layer_imports_only_layers_below_it() -> None:
    wrong = []
    for module, path in ALL.items():
        mine = LAYERS.index(layer(module))
        for name, line in imports(path, top_level_only=False):
            target = owner(name) if name.startswith("isodiff") else None
            if target and LAYERS.index(layer(target)) > mine:
                wrong.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line} ({layer(module)}) "
                    f"imports {target} ({layer(target)})"
                )
    assert not wrong, "\n".join(wrong)


def test_the_core_imports_torch_alone() -> None:
    """On import, torch and the standard library; inside a function, also an optional extra
    that only that function needs (peft, the `lora` extra, in `isodiff.lora.add_lora`)."""
    wrong = []
    for module, path in ALL.items():
        if layer(module) != "core":
            continue
        on_import = {name for name, _ in imports(path, top_level_only=True)}
        for name, line in imports(path, top_level_only=False):
            root = name.split(".")[0]
            allowed = {"torch", "__future__", *STDLIB} | (
                set() if name in on_import else set(OPTIONAL_EXTRAS)
            )
            if root == "isodiff" and layer(owner(name) or name) == "core":
                continue
            if root not in allowed:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not wrong, "\n".join(wrong)


def loaded_on_import(module: str) -> dict[str, str]:
    """Every module that importing `module` runs (isodiff's own, transitively, and the first
    third-party name of each), each with the isodiff module that imports it first."""
    seen: dict[str, str] = {}
    todo = [module]
    while todo:
        current = todo.pop()
        for name, _ in imports(ALL[current], top_level_only=True):
            target = owner(name) if name.startswith("isodiff") else name.split(".")[0]
            if target and target not in seen:
                seen[target] = current
                if target in ALL:
                    todo.append(target)
            # a package's __init__ runs before its module
            if target in ALL and "." in target:
                parent = target.rpartition(".")[0]
                if parent not in seen:
                    seen[parent] = current
                    todo.append(parent)
    return seen


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_an_entry_point_loads_nothing_heavy_before_its_config_is_valid(entry: str) -> None:
    loaded = loaded_on_import(entry)
    heavy = {name: by for name, by in loaded.items() if name in HEAVY}
    assert not heavy, f"importing {entry} loads " + ", ".join(
        f"{name} (imported by {by})" for name, by in sorted(heavy.items())
    )


def test_the_rule_sees_a_violation(tmp_path: Path) -> None:
    """The reader itself: an upward and a heavy import in a planted module are found."""
    planted = tmp_path / "m.py"
    planted.write_text(
        "import os\nimport torch\ndef f():\n    from isodiff.sweep import plan\n"
        "if TYPE_CHECKING:\n    import diffusers\n"
    )
    assert [n for n, _ in imports(planted, top_level_only=True)] == ["os", "torch"]
    assert [n for n, _ in imports(planted, top_level_only=False)] == [
        "os",
        "torch",
        "isodiff.sweep.plan",
        "diffusers",
    ]
    assert layer("isodiff.isometry") == "core" and layer("isodiff.sweep.plan") == "sweep"
    assert layer("isodiff.cli") == "config" and layer("isodiff.errors") == "errors"
