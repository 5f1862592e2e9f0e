"""The study as one papermill pipeline: `python -m fclib.pipeline --profile NAME`.

Runs the numbered notebooks in order into `outputs/<run_name>/notebooks/`, passing one set of
parameters to all of them (each notebook receives the ones its `parameters` cell declares),
and stops at the first failing notebook, streaming each notebook's output to the terminal. Writes
`params.yaml`, `env.json` (packages, machine, commit), and the wall time and peak memory of each
notebook (`timings.json`, `memory.json`, and `gpu_memory.json` where nvidia-smi is) beside them.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import yaml

from fclib import runs
from fclib.agent import AgentConfig
from fclib.evaluate import EvalSettings
from fclib.models import hub_fault, hub_id, in_hub_cache
from fclib.pairs import PairSettings
from fclib.runs import PROJECT_ROOT, TEXT_PROGRESS_ENV
from fclib.settings import SettingsError
from fclib.tasks import ProblemSettings, gsm8k
from fclib.teacher import KEY_REFUSED, TeacherSettings, is_variable_name
from fclib.train import TrainSettings

NOTEBOOKS = PROJECT_ROOT / "notebooks"
PROFILES = PROJECT_ROOT / "profiles"
KERNEL = "fclib"  # the Jupyter kernel scripts/setup.sh installs (.venv's Python)
NOTEBOOK_PROFILE_ENV = "FCLIB_NOTEBOOK_PROFILE"
LAST_STAGE = "05"  # the study's notebooks are 01-05; 06 compares finished runs (fclib.sweep runs it)
NEWLINE = b"\n"
log = logging.getLogger(__name__)

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
    if not path.is_file():
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


def notebook_parameters() -> dict[str, Any]:
    """{parameter: default} of every notebook's `parameters` cell (the defaults are the cpu profile's)."""

    declared: dict[str, Any] = {}
    for nb in notebooks():
        cell = next(
            c for c in json.loads(nb.read_text())["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])
        )
        for node in ast.parse("".join(cell["source"])).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                declared[node.targets[0].id] = ast.literal_eval(node.value)
    return declared


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


def hub_sources(params: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(parameter, hub id, 'model' or 'dataset') of every model and data source of a run that is not local."""
    models = {"student": params["student"]}
    if not params["teacher_url"]:
        models["teacher"] = params["teacher"]
    found = [(key, repo, "model") for key, name in models.items() if (repo := hub_id(name))]
    if repo := gsm8k.hub_id(params["gsm8k_source"]):
        found.append(("gsm8k_source", repo, "dataset"))
    return found


def go_offline_unless_needed(params: dict[str, Any]) -> None:
    """Offline when every model and data source of the run is local or in the hub cache, else online.

    Offline is forced (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1, unless already set) only for a
    run that needs nothing from the hub. A run that does is checked against the hub at once:
    what cannot be fetched (offline, unreachable, not found) stops it before any notebook runs,
    with one line per source saying how to give a local folder instead.
    """
    missing = [(key, repo, kind) for key, repo, kind in hub_sources(params) if not in_hub_cache(repo, kind)]
    if not missing:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        return
    wrong = []
    for key, repo, kind in missing:
        fault = hub_fault(repo, kind)
        if fault and kind == "dataset":
            wrong.append(
                f"cannot fetch {key} {repo!r} from the Hugging Face hub ({fault}): leave {key} empty for the "
                f"shipped GSM8K, or give a folder of {{train,test}}.jsonl files: -p {key}=/path/to/folder"
            )
        elif fault:
            wrong.append(
                f"cannot fetch {key} {repo!r} from the Hugging Face hub ({fault}): give a local model folder "
                f"instead, -p {key}=/path/to/folder (made online by: hf download {repo} --local-dir /path/to/folder)"
            )
    if wrong:
        raise SystemExit("\n".join(wrong))


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
    """The study's numbered notebooks (01-05) in order, from `start` (e.g. '03') to `stop` (inclusive)."""
    found = [p for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) if p.name[:2] <= LAST_STAGE]
    if start:
        found = [p for p in found if p.name[:2] >= start.zfill(2)]
    if stop:
        found = [p for p in found if p.name[:2] <= stop.zfill(2)]
    if not found:
        raise SystemExit(f"no notebooks to run in {NOTEBOOKS}" + (f" from {start}" if start else ""))
    return found


def environment() -> dict[str, Any]:
    """What a run ran on: Python, every installed package, CPU, GPU and the project's git commit."""
    import torch

    packages = {d.metadata["Name"]: d.version for d in metadata.distributions() if d.metadata["Name"]}
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": {"model": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpus,
        "device": gpus[0] if gpus else f"cpu ({torch.get_num_threads()} threads)",
        "git": _git_state(),
        "packages": dict(sorted(packages.items(), key=lambda kv: kv[0].lower())),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_state() -> dict[str, Any] | None:
    """The commit of the project checkout and whether it had uncommitted changes (None outside git)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


class PeakMemory:
    """Peak resident memory of this process and all its children (the notebook's kernel, servers it starts),
    and, where `nvidia-smi` is, peak GPU memory in use on the machine's GPUs.

    Sampled every `interval` seconds (GPU memory every `gpu_interval`) in a background thread;
    `peak_gib` and `peak_gpu_gib` (None without nvidia-smi) are the largest sums seen.
    """

    def __init__(self, interval: float = 0.5, gpu_interval: float = 2.0):
        self.interval, self.gpu_interval, self.peak = interval, gpu_interval, 0
        self.peak_gpu: int | None = 0 if shutil.which("nvidia-smi") else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        next_gpu = 0.0
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:  # a child that ended between listing and reading
                    pass
            self.peak = max(self.peak, total)
            if self.peak_gpu is not None and time.monotonic() >= next_gpu:
                self.peak_gpu = max(self.peak_gpu, _gpu_memory_used())
                next_gpu = time.monotonic() + self.gpu_interval
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_gib(self) -> float:
        return round(self.peak / 2**30, 2)

    @property
    def peak_gpu_gib(self) -> float | None:
        return None if self.peak_gpu is None else round(self.peak_gpu / 2**30, 2)


def _gpu_memory_used() -> int:
    """Bytes of memory in use on all GPUs, by nvidia-smi (0 when it cannot tell)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return sum(int(float(line)) for line in out.split() if line.strip()) * 2**20  # MiB
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0


def run(params: dict[str, Any], start: str | None = None, stop: str | None = None) -> Path:
    """Execute the notebooks with papermill; returns the run folder.

    Each notebook's output (its prints and progress bars, as text) streams to this process's
    stdout and stderr while it runs. The wall time and peak memory of each notebook go to
    `timings.json` and `memory.json`.
    """
    import papermill as pm

    go_offline_unless_needed(params)
    run_folder = runs.run_folder(params["run_name"])
    (run_folder / "notebooks").mkdir(exist_ok=True)
    runs.write_yaml(run_folder / "params.yaml", params)
    runs.write_json(run_folder / "env.json", environment())
    os.environ.pop(NOTEBOOK_PROFILE_ENV, None)  # the kernels papermill starts must use the injected parameters
    os.environ[TEXT_PROGRESS_ENV] = "1"  # progress bars as text, so they reach the terminal
    os.environ.setdefault("TQDM_MININTERVAL", "5")  # and update every few seconds, not every 0.1 s
    timings = runs.read_record_file(run_folder / "timings.json")
    memory = runs.read_record_file(run_folder / "memory.json")
    gpu_memory = runs.read_record_file(run_folder / "gpu_memory.json")
    todo = notebooks(start, stop)
    for i, nb in enumerate(todo, 1):
        declared = pm.inspect_notebook(str(nb))
        given = {k: v for k, v in params.items() if k in declared}
        target = run_folder / "notebooks" / nb.name
        log.info("[%d/%d] %s: running (executed copy: %s)", i, len(todo), nb.stem, target)
        t0 = time.perf_counter()
        try:
            with PeakMemory() as peak:
                pm.execute_notebook(
                    str(nb),
                    str(target),
                    parameters=given,
                    cwd=str(NOTEBOOKS),
                    kernel_name=KERNEL,
                    progress_bar=False,
                    stdout_file=sys.stdout,
                    stderr_file=sys.stderr,
                )
        except pm.PapermillExecutionError as e:
            raise SystemExit(
                f"{nb.name} failed in cell {e.exec_count}: {e.ename}: {e.evalue}\nthe executed notebook is at {target}"
            ) from None
        timings[nb.stem], memory[nb.stem] = round(time.perf_counter() - t0, 1), peak.peak_gib
        runs.write_json(run_folder / "timings.json", timings)
        runs.write_json(run_folder / "memory.json", memory)
        if peak.peak_gpu_gib is not None:
            gpu_memory[nb.stem] = peak.peak_gpu_gib
            runs.write_json(run_folder / "gpu_memory.json", gpu_memory)
        log.info(
            "[%d/%d] %s: done in %.0f s, peak memory %.2f GiB", i, len(todo), nb.stem, timings[nb.stem], peak.peak_gib
        )
    return run_folder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fclib.pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu", help="profiles/NAME.yaml (smoke, cpu, ...)")
    ap.add_argument("--run-name", help="folder under outputs/ (default: the profile's run_name)")
    ap.add_argument("--from", dest="start", help="start at notebook NN, reusing earlier results of the run")
    ap.add_argument("--to", dest="stop", help="stop after notebook NN")
    ap.add_argument(
        "-p", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a parameter"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {}
    for item in args.overrides:
        if "=" not in item:
            raise SystemExit(f"-p expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            overrides[key.strip()] = yaml.safe_load(value)  # typed like YAML: 3, 0.5, true, [10, 20], text
        except yaml.YAMLError:
            overrides[key.strip()] = value  # not YAML (an unclosed bracket, say): the text itself, checked as any value
    if args.run_name:
        overrides["run_name"] = args.run_name
    params = load_profile(args.profile, overrides)
    t0 = time.perf_counter()
    run_folder = run(params, args.start, args.stop)
    minutes, seconds = divmod(round(time.perf_counter() - t0), 60)
    peak = max(runs.read_record_file(run_folder / "memory.json").values(), default=0)
    print(
        f"done in {minutes} min {seconds} s (peak memory {peak:.2f} GiB): "
        f"the results of run {params['run_name']!r} are in {run_folder}"
    )


if __name__ == "__main__":
    main()
