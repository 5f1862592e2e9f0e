"""What a run's parameters are: the profiles, their checks, and a run's `params.yaml` as its notebooks see it.

- `load_profile(name, overrides)`: a profile (profiles/NAME.yaml) with overrides, every value checked before
  anything runs, by the stage that uses it (`validate`).
- `run_parameters(globals())`: called by notebooks 01-05 right after their `parameters` cell. A run folder's
  `params.yaml` is what its notebooks use: a value the cell leaves at its default takes the run's, and a value
  the cell changes must agree with the results the run already holds (`RunParametersError` says how not).
- `changed_under(...)`: the parameters whose change would leave a run's results made with other values.
"""

from __future__ import annotations

import ast
import difflib
import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from fclib import runs
from fclib.agent import AgentConfig
from fclib.evaluate import EvalSettings
from fclib.pairs import PairSettings
from fclib.runs import PROJECT_ROOT
from fclib.settings import SettingsError
from fclib.tasks import ProblemSettings
from fclib.teacher import KEY_REFUSED, TeacherSettings, is_variable_name
from fclib.train import TrainSettings

NOTEBOOKS = PROJECT_ROOT / "notebooks"
PROFILES = PROJECT_ROOT / "profiles"

NOTEBOOK_PROFILE_ENV = "FCLIB_NOTEBOOK_PROFILE"
LAST_STAGE = "05"  # the study's notebooks are 01-05; 06 compares finished runs (fclib.sweep runs it)
NEWLINE = b"\n"

RECIPES = {  # what each recipe sets; `-p recipe=NAME` applies these values, then any other -p
    # fclib's: pairs at the first divergent call plus step pairs, reference chains as chosen, an SFT term
    "fclib": {
        "pair_strategy": "first_divergence",
        "use_reference": True,
        "step_samples": 1,
        "pair_kinds": ["chains", "steps"],
        "loss_type": ["sigmoid", "sft"],
        "loss_weights": [1.0, 1.0],
    },
    # arXiv 2410.18890 as it describes its method: whole correct vs incorrect teacher chains, teacher chains
    # only, plain sigmoid DPO, FOL worlds of nmax 10 and 20. A run that says `recipe: paper` holds all of these.
    "paper": {
        "pair_strategy": "all",
        "use_reference": False,
        "step_samples": 0,
        "pair_kinds": ["chains"],
        "loss_type": ["sigmoid"],
        "loss_weights": [1.0],
        "nmax": [10, 20],
    },
}
PIPELINE_PARAMETERS = {"recipe": "fclib"}  # parameters of the run itself, which no notebook reads


def load_profile(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parameters of a profile (profiles/NAME.yaml) with overrides applied.

    Every value is checked against the type of that parameter's default in the notebooks'
    `parameters` cells (the one place parameters are declared): a bad profile line is named
    with its file and line, a bad override with the parameter and what it accepts.
    """
    path = PROFILES / f"{name}.yaml"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", str(name)) or not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
        raise SystemExit(f"no profile {name!r}; the profiles are: {known}")
    params, lines = _read_profile(path)
    declared = {**notebook_parameters(), **PIPELINE_PARAMETERS}
    wrong = [
        f"{path}, line {lines[k]}: unknown parameter {k!r}{_did_you_mean(k, declared)}"
        for k in params
        if k not in declared
    ]
    wrong += [
        f"{path}, line {lines[k]}: {fault}"
        for k, v in params.items()
        if k in declared
        for fault in [_type_fault(k, v, declared[k])]
        if fault
    ]
    missing = [k for k in declared if k not in params]
    if missing:
        wrong.append(f"{path}: parameters missing: {', '.join(missing)} (a profile sets every parameter)")
    if wrong:
        raise SystemExit("bad profile:\n- " + "\n- ".join(wrong))
    overrides = dict(overrides or {})
    if overrides.get("recipe") in RECIPES:  # the recipe's values first; the other overrides win
        overrides = {**RECIPES[overrides["recipe"]], **overrides}
    for key, value in overrides.items():
        if key not in params:
            raise SystemExit(
                f"unknown parameter {key!r}{_did_you_mean(key, params)}; profile {name} has: {', '.join(params)}"
            )
        if key == "teacher_api_key_env" and not is_variable_name(value):
            raise SystemExit(KEY_REFUSED)
        fault = _type_fault(key, value, declared[key])
        if fault:
            raise SystemExit(fault)
        params[key] = value
    try:
        runs.run_folder(params["run_name"], create=False)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    problems = validate(params, name)
    if problems:
        raise SystemExit("impossible parameters:\n- " + "\n- ".join(problems))
    return params


def _read_profile(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """(parameters, line of each) of a profile file; a YAML fault or a repeated key is named with its line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
        node = yaml.compose(text)
        params = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise SystemExit(f"{path}, line {raw[: e.start].count(NEWLINE) + 1}: not valid UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise SystemExit(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(params, dict) or not isinstance(node, yaml.MappingNode):
        raise SystemExit(f"{path}: a profile is a mapping of parameter: value, one a line")
    lines: dict[str, int] = {}
    for key, _ in node.value:
        if key.value in lines:
            raise SystemExit(
                f"{path}, line {key.start_mark.line + 1}: parameter {key.value!r} is set twice "
                f"(first on line {lines[key.value]})"
            )
        lines[key.value] = key.start_mark.line + 1
    return params, lines


@functools.cache
def declared_parameters() -> dict[str, dict[str, Any]]:
    """{NN: {parameter: default}} of each study notebook's `parameters` cell (the defaults are the cpu profile's)."""
    declared: dict[str, dict[str, Any]] = {}
    for nb in notebooks():
        cell = next(
            c for c in json.loads(nb.read_text())["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])
        )
        declared[nb.name[:2]] = {
            node.targets[0].id: ast.literal_eval(node.value)
            for node in ast.parse("".join(cell["source"])).body
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        }
    return declared


def notebook_parameters() -> dict[str, Any]:
    """{parameter: default} of every study notebook's `parameters` cell (the defaults are the cpu profile's)."""
    return {k: v for params in declared_parameters().values() for k, v in params.items()}


def _type_fault(key: str, value: Any, default: Any) -> str | None:
    """Why `value` cannot be parameter `key` (whose default is `default`), or None when it can."""
    kind = "a number" if isinstance(default, float) else type(default).__name__
    if key == "nmax":
        kind = "int or a list of ints"
    if value is None:
        return None if default is None else f"parameter {key} must be {kind}, got null"
    if default is None or type(value) is type(default):
        return None
    if isinstance(default, float) and type(value) is int:  # 1 where 1.0 is meant
        return None
    if key == "nmax" and isinstance(value, list):
        return None
    return (
        f"parameter {key} must be {kind}, got {str(value)[:60]!r}"
        if isinstance(value, str)
        else f"parameter {key} must be {kind}, got {value!r}"
    )


def _did_you_mean(key: str, known: Any) -> str:

    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


STAGE_SETTINGS = (ProblemSettings, TeacherSettings, PairSettings, TrainSettings, EvalSettings)


def validate(params: dict[str, Any], profile: str = "") -> list[str]:
    """What is wrong with a parameter set, before anything runs (empty when nothing is).

    Each stage's settings check their own values; this adds only what involves a profile.
    """
    wrong: list[str] = []
    builds = [lambda cls=cls: cls.from_params(params) for cls in STAGE_SETTINGS]
    builds += [  # the agent of the teacher (notebook 02) and of evaluation (notebook 05)
        lambda: AgentConfig.from_params(params, temperature=params["temperature"]),
        lambda: AgentConfig.from_params(params),
    ]
    for build in builds:
        try:
            build()
        except SettingsError as e:
            wrong += [fault for fault in e.faults if fault not in wrong]
    recipe = params.get("recipe", "fclib")
    if recipe not in RECIPES:
        wrong.append(f"recipe must be one of {', '.join(RECIPES)}, not {recipe!r}")
    elif recipe == "paper":  # the name promises the paper's method: every value of it, or another recipe
        wrong += [
            f"recipe paper sets {key}: {value!r}, not {params[key]!r} (for other values use recipe fclib)"
            for key, value in RECIPES["paper"].items()
            if params[key] != value
        ]
    if profile == "paper" and not params["teacher_url"]:
        wrong.append("the paper profile needs a teacher endpoint: -p teacher_url=https://... -p teacher=MODEL")
    return wrong


def notebook_profile(namespace: dict[str, Any]) -> str | None:
    """Called by each notebook right after its parameters cell.

    A notebook's parameter defaults are the `cpu` profile, for people stepping through it. CI
    runs the notebooks under nbval, which cannot pass parameters: it sets
    $FCLIB_NOTEBOOK_PROFILE (to `smoke`), and this replaces the defaults of the parameters the
    notebook declares with that profile's values. The pipeline runner removes the variable, so
    the parameters papermill injects always win. Returns the profile applied, if any.
    """
    name = os.environ.get(NOTEBOOK_PROFILE_ENV)
    if not name:
        return None
    params = load_profile(name)
    namespace.update({k: v for k, v in params.items() if k in namespace})
    print(f"parameters of profile {name!r} (${NOTEBOOK_PROFILE_ENV} is set)")
    return name


def notebooks(start: str | None = None, stop: str | None = None) -> list[Path]:
    """The study's numbered notebooks (01-05) in order, from `start` (e.g. '03') to `stop` (inclusive).

    `start` and `stop` are the two digits of a study notebook (1 for 01 also works); anything else stops at once.
    """
    found = [p for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) if p.name[:2] <= LAST_STAGE]
    numbers = [p.name[:2] for p in found]
    for flag, value in (("--from", start), ("--to", stop)):
        if value is not None and (not re.fullmatch(r"\d{1,2}", str(value)) or str(value).zfill(2) not in numbers):
            raise SystemExit(f"{flag} takes the number of a study notebook ({', '.join(numbers)}), not {value!r}")
    if start and stop and str(stop).zfill(2) < str(start).zfill(2):
        raise SystemExit(f"--to {stop} comes before --from {start}: nothing to run")
    if start:
        found = [p for p in found if p.name[:2] >= str(start).zfill(2)]
    if stop:
        found = [p for p in found if p.name[:2] <= str(stop).zfill(2)]
    return found


# What each notebook writes in a run folder (folders, files, glob patterns), so that a run can take another's
# outputs of the stages they share (fclib.sweep), and tell which stages have results. The first entry of each is
# the stage's results; a test checks that a smoke run writes nothing else.
STAGE_OUTPUTS = {
    "01": ["problems", "figures/gsm8k_*"],
    "02": ["chains", "figures/teacher_*"],
    "03": ["pairs", "figures/pair_*"],
    "04": ["model", "train", "figures/margins_*", "figures/training_*", "figures/dpo_loss_*"],
    "05": ["eval", "report.md", "figures/eval_*"],
}


class RunParametersError(ValueError):
    """A notebook's parameters disagree with results its run already holds; the message lists each difference."""


def stages_with_results(folder: Path) -> list[str]:
    """The notebooks (NN) whose results (the first entry of STAGE_OUTPUTS) are in a run folder."""
    return [nn for nn, outputs in STAGE_OUTPUTS.items() if (folder / outputs[0]).exists()]


def changed_under(folder: Path, old: dict[str, Any], new: dict[str, Any], stages: list[str] | None = None) -> list[str]:
    """The parameters whose value differs between `old` (what the run's results were made with) and `new`, and that
    a notebook among `stages` (default: all) reads whose results are in `folder`: one line each, saying which."""
    declared, made = declared_parameters(), stages_with_results(folder)
    wrong = []
    for key in sorted(set(old) | set(new)):
        if key == "run_name" or old.get(key) == new.get(key):
            continue
        stale = [nn for nn in made if key in declared[nn] and (stages is None or nn in stages)]
        if stale:
            results = ", ".join(STAGE_OUTPUTS[nn][0] + "/" for nn in stale)
            wrong.append(f"{key}: {old.get(key)!r} in the run, {new.get(key)!r} here ({results} made with the first)")
    return wrong


def run_parameters(namespace: dict[str, Any]) -> dict[str, Any]:
    """Called by notebooks 01-05 right after their `parameters` cell: make the cell's values the run's.

    A run folder's `params.yaml` is what its notebooks use. A parameter the cell leaves at its default takes
    the run's value (a notebook opened in JupyterLab for a run made with another profile follows that run);
    one the cell sets otherwise must agree with the run's results: where the run holds results of a notebook
    that reads it, made with another value, `RunParametersError` lists each difference; where it holds none,
    the cell's value becomes the run's (written to params.yaml). A run without params.yaml gets one, the
    defaults with the cell's values. The notebook's kernel also holds the run folder (`runs.hold`), so no
    pipeline runs on it meanwhile. Returns the run's parameters.
    """
    notebook_profile(namespace)
    defaults = load_profile(os.environ[NOTEBOOK_PROFILE_ENV]) if os.environ.get(NOTEBOOK_PROFILE_ENV) else None
    defaults = defaults or {**notebook_parameters(), **PIPELINE_PARAMETERS}
    keys = [k for k in defaults if k in namespace and k != "run_name"]
    try:
        folder = runs.run_folder(namespace["run_name"])
    except ValueError as e:
        raise RunParametersError(str(e)) from None
    runs.hold(folder)
    path = folder / "params.yaml"
    saved = runs.read_mapping(path)
    if saved is None:
        params = {**defaults, **{k: namespace[k] for k in keys}, "run_name": namespace["run_name"]}
        if not runs.held_by_parent(folder):  # the pipeline writes its own
            runs.write_yaml(path, params)
        return params
    saved = {**defaults, **saved}  # a parameter newer than the run: its default is what the run ran with
    cell = {k: namespace[k] for k in keys}
    chosen = {k: v for k, v in cell.items() if v != defaults[k] and v != saved[k]}  # what the cell sets otherwise
    conflicting = {k: v for k, v in chosen.items() if changed_under(folder, saved, {**saved, k: v})}
    if conflicting:
        conflicts = changed_under(folder, saved, {**saved, **conflicting})
        declared = declared_parameters()
        first = min(nn for nn in declared for key in conflicting if key in declared[nn])
        given = " ".join(f"-p {k}={json.dumps(v)}" for k, v in conflicting.items())
        raise RunParametersError(
            f"run {namespace['run_name']!r} ({path}) holds results made with other values than this notebook's:\n- "
            + "\n- ".join(conflicts)
            + "\nTo follow the run, set them back (or restart the kernel). To try these values, start another run "
            f"(another run_name here, or ./study.sh --run-name NEW {given}), or redo this run from notebook {first}: "
            f"./study.sh --run-name {namespace['run_name']} --from {first} {given} (and the run's profile and -p)"
        )
    taken = {k: saved[k] for k in keys if cell[k] == defaults[k] and cell[k] != saved[k]}
    namespace.update(taken)
    if taken:
        shown = ", ".join(f"{k}={v!r}" for k, v in taken.items())
        print(f"parameters of run {namespace['run_name']!r} ({path}): {shown}")
    if chosen and not runs.held_by_parent(folder):
        runs.write_yaml(path, {**saved, **chosen})
        shown = ", ".join(f"{k}={v!r}" for k, v in chosen.items())
        print(f"{path}: {shown} (the run holds no results made with the old values)")
    return {**saved, **chosen}
