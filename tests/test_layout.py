"""The layout tells the story: core modules, then one module per stage in notebook order, then the runner.

Arrows run one way: a module imports only modules of an earlier layer (or its own package),
so no core module reaches into a stage and no stage into a later one.
"""

from __future__ import annotations

import ast
from pathlib import Path

from fclib.runs import PROJECT_ROOT

LAYERS = [  # earlier first; a module may import only from earlier layers or from its own package
    {"runs", "settings"},
    {"problems", "protocol", "models", "fast", "checkpoints"},
    {"tools", "backends"},
    {"agent"},
    {"tasks"},
    {"chains"},
    {"teacher"},  # notebook 02
    {"pairs"},  # notebook 03
    {"train"},  # notebook 04
    {"evaluate"},  # notebook 05
    {"compare"},  # notebook 06
    {"profiles"},  # a run's parameters: the profiles, and params.yaml as the notebooks see it
    {"plots", "pipeline"},
    {"sweep"},  # many pipeline runs
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
PACKAGE = PROJECT_ROOT / "fclib"


def _top(module: str) -> str:
    """`fclib.backends.local` -> `backends`."""
    return module.split(".")[1]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):  # imports inside functions count too
        if isinstance(node, ast.ImportFrom) and node.module == "fclib":  # from fclib import runs
            found |= {f"fclib.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fclib."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fclib.")}
    return found


def test_every_module_has_a_layer():
    modules = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert modules == set(LAYER), (
        f"modules without a layer: {modules - set(LAYER)}; layers without a module: {set(LAYER) - modules}"
    )


def test_imports_run_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        here = parts[0]
        for module in _imports(path):
            there = _top(module)
            if there != here and LAYER[there] >= LAYER[here]:
                wrong.append(
                    f"{path.relative_to(PROJECT_ROOT)} imports {module} (layer {LAYER[there]} >= {LAYER[here]})"
                )
    assert not wrong, "\n".join(wrong)


def test_the_readme_layout_names_every_module():
    readme = (PROJECT_ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :].split("```")[1]
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if path.name == "__init__.py":
            name = name.removesuffix("__init__.py")
        if name:
            assert name in layout, f"the README's layout does not mention fclib/{name}"


# Imported inside the functions that use them, and only there: each takes about a second or more
# to import (measured on the 2-core CI machine: peft 13 s with its dependencies, statsmodels 4 s,
# torch 3 s, papermill 3 s, datasets 2.4 s, transformers 2.1 s, scipy.stats 1.6 s, matplotlib 1.2 s,
# openai 1.2 s, trl 0.6 s, accelerate 4 s as it imports torch), and the parser, the loaders and the
# CLI's checks must not wait for them.
HEAVY = {
    "torch",
    "transformers",
    "trl",
    "peft",
    "bitsandbytes",
    "datasets",
    "scipy",
    "statsmodels",
    "matplotlib",
    "papermill",
    "nbclient",  # papermill's executor: 1.3 s
    "openai",
    "accelerate",
}


def test_imports_inside_functions_are_only_the_heavy_ones():
    light = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for function in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                for name in names:
                    cycle = path == PACKAGE / "backends" / "__init__.py" and name.startswith("fclib.backends.")
                    if name.split(".")[0] not in HEAVY and not cycle:  # backends' modules import the package itself
                        light.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} imports {name} inside a function")
    assert not light, "\n".join(light)
