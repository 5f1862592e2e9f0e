"""Many whole studies in one command: `python -m fclib.sweep --profile cpu --seeds 0-4 [-p key=v1,v2 ...]`.

A sweep is a grid: every seed times every combination of the `-p` values (and, with
`--variants FILE`, every named variant of that file). Each cell is one whole study, run by
`fclib.pipeline` into its own run folder, `outputs/<sweep>/<variant>-s<seed>/`. Then notebook 06
compares them all (`outputs/<sweep>/06_compare_runs.ipynb`, figures in `outputs/<sweep>/figures/`).

- **Shared stages run once.** Each notebook's outputs have a key: for 01 its parameters; for a
  later one the parameters it and the notebooks from 02 on read, and the content of the problem
  files they read. A run copies the outputs of the notebooks whose keys equal those of a finished
  run, and runs only the rest: the chains of one seed are generated once for all variants that
  differ from notebook 03 on, and a variant that changes only the held-out problems (test_nmax,
  fol_test) reuses the chains and the adapter, running notebooks 01 and 05.
  The untrained student's evaluation is copied too wherever the test problems and notebook 05's
  parameters are the same: it does not depend on the chains, pairs or training.
  `--reuse FOLDER` adds the finished runs of another sweep as sources (say, the ablations of a
  seeds sweep: the default variant is copied whole, the others take its chains).
- **Resumable.** Killed, the same command carries on: finished notebooks of each run are kept
  (their wall times are in the run's `timings.json`), a run stopped inside notebook 04 resumes
  from its last checkpoint. `--only PATTERNS` runs just the runs whose names match (say
  `paper-*,*-s1`) and leaves the others for a later call.
- **Recorded.** `outputs/<sweep>/sweep.json` holds the grid, the commit, and each run's state,
  what it reused and its wall time, rewritten after every run; `--record DIR` also copies each
  run's results (parameters, timings, memory, metrics) into DIR, e.g. a tracked folder.
- A run that fails is recorded as failed and the sweep goes on with the others; the exit status
  is 1 when any failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import yaml

from fclib import compare, pipeline, profiles, runs

log = logging.getLogger(__name__)

STAGE_OUTPUTS = profiles.STAGE_OUTPUTS  # what each notebook writes in a run folder
RUN_FILES = ["params.yaml", "env.json", "timings.json", "memory.json", "gpu_memory.json", "notebooks", runs.LOCK_FILE]
RUN_FILES += ["screenshots"]  # the browser test's, of notebook 01 in JupyterLab: no stage's output
# What the notebooks after 01 read of its output: a stage's key covers these files' content
PROBLEM_FILES = {"02": "problems/train.jsonl", "05": "problems/test.jsonl"}
# Notebook 05's results ledger resumes per model label: a run that shares everything up to 05 with another
# (its adapter and its test problems) starts 05 from a copy of the other's results and runs only the models
# (eval_models) the other did not; a label made with another model or agent is redone (fclib.chains: the
# ledger's meta file holds each label's model and agent settings).
EVAL_RESULTS = ["eval/results.jsonl", "eval/results.meta.json"]
# The untrained student's results depend on the test problems and notebook 05's parameters alone, never on the
# chains, pairs or training: a run may take them from another with the same test problems and these parameters equal.
STUDENT_MODELS = ("base", "base+grammar")
NOT_READ_BY_STUDENT = {"run_name", "eval_models", "dpo_model", "dpo_url"}  # notebook 05 parameters of DPO or none
# What --record keeps of a run: its numbers (its report.md shows figures the record does not keep)
RECORDED = ["params.yaml", "timings.json", "memory.json", "gpu_memory.json", "eval/metrics.json"]
RECORDED += ["chains/summary.json", "pairs/stats.json"]  # the teacher's yield and the pairs it gave
COMPARE_NOTEBOOK = profiles.NOTEBOOKS / "06_compare_runs.ipynb"
SWEEP_FILE = "sweep.json"


@dataclass
class Run:
    """One cell of the grid: its name, what it changes in the profile, and its whole parameter set."""

    name: str
    variant: str
    seed: int
    overrides: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)


def parse_seeds(text: str) -> list[int]:
    """'0-4' -> [0, 1, 2, 3, 4]; '0,2,7' and '0-2,5' too."""
    seeds: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m[2] is not None and int(m[2]) < int(m[1])):
            raise SystemExit(f"--seeds takes numbers and ranges like 0-4 or 0,2,5; got {text!r}")
        seeds += range(int(m[1]), int(m[2] or m[1]) + 1)
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds names a seed twice: {text!r}")
    return seeds


def split_values(text: str) -> list[Any]:
    """The values of `-p key=v1,v2`, each typed like YAML; commas inside [...] belong to a list value."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    values = []
    for part in parts:
        try:
            values.append(yaml.safe_load(part))
        except yaml.YAMLError:
            values.append(part)
    return values


def _slug(value: Any) -> str:
    text = "+".join(map(str, value)) if isinstance(value, list) else str(value)
    return re.sub(r"[^A-Za-z0-9.+_-]", "", text.replace(" ", ""))[:40] or "empty"


def grid(
    seeds: list[int], axes: dict[str, list[Any]] | None = None, variants: dict[str, dict[str, Any]] | None = None
) -> list[Run]:
    """The runs of a sweep, seed by seed (so a seed's shared stages come first and are reused at once).

    `axes` ({key: [values]}) make a full grid; `variants` ({name: overrides}) are named rows added to
    each cell of it. With neither, one variant: the profile itself.
    """
    cells: list[tuple[str, dict[str, Any]]] = [("", {})]
    for key, values in (axes or {}).items():
        cells = [(f"{name}_{key}-{_slug(v)}".lstrip("_"), {**over, key: v}) for name, over in cells for v in values]
    if variants:
        cells = [
            (f"{name}_{vname}".lstrip("_"), {**over, **vover})
            for name, over in cells
            for vname, vover in variants.items()
        ]
    found = []
    for seed in seeds:
        for name, over in cells:
            run_name = f"{name}-s{seed}" if name else f"s{seed}"
            found.append(Run(run_name, name or "default", seed, {**over, "seed": seed}))
    names = [r.name for r in found]
    if len(set(names)) != len(names):
        raise SystemExit("two runs of the sweep would have the same name; give the variants distinct names")
    return found


def stage_keys(params: dict[str, Any], declared: dict[str, set[str]], folder: Path | None = None) -> dict[str, Any]:
    """{notebook NN: digest of all its outputs depend on}: equal digests, equal outputs.

    Notebook 01: its parameters. A later notebook: the parameters it and the notebooks from 02 on
    read, and the problem files (PROBLEM_FILES) they read, as they are in `folder`. So a run that
    changes only the held-out problems (test_nmax, fol_test) shares the chains and the adapter of
    one that does not. Until notebook 01 has run in `folder` those keys are None, equal to nothing.
    """
    first, *later = sorted(declared)
    keys: dict[str, Any] = {first: _digest({k: params.get(k) for k in declared[first] - {"run_name"}})}
    seen: set[str] = set()
    files: dict[str, str | None] = {}
    for nn in later:
        seen |= declared[nn] - {"run_name"}
        if nn in PROBLEM_FILES:
            path = folder / PROBLEM_FILES[nn] if folder is not None else None
            files[PROBLEM_FILES[nn]] = _digest(path.read_bytes()) if path is not None and path.is_file() else None
        missing = None in files.values()
        keys[nn] = None if missing else _digest({"params": {k: params.get(k) for k in seen}, "files": files})
    return keys


def _digest(value: Any) -> str:
    data = value if isinstance(value, bytes) else json.dumps(value, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def evaluated_on(folder: Path, test: Path) -> bool:
    """Whether a run folder holds evaluation results (EVAL_RESULTS) on the same test problems as the file `test`."""
    theirs = folder / PROBLEM_FILES["05"]
    return (
        all((folder / rel).is_file() for rel in EVAL_RESULTS)
        and theirs.is_file()
        and theirs.read_bytes() == test.read_bytes()
    )


def declared_parameters() -> dict[str, set[str]]:
    """{NN: the parameters notebook NN's parameters cell declares} for the study's notebooks."""
    return {nn: set(declared) for nn, declared in profiles.declared_parameters().items()}


def saved_parameters(folder: Path) -> dict[str, Any]:
    """A run folder's parameters, with each parameter added to the notebooks since at its default: a new
    parameter's default keeps what the notebooks did before it existed, so that is what the run ran with."""
    return {**profiles.notebook_parameters(), **(runs.read_mapping(folder / "params.yaml") or {})}


def done_notebooks(folder: Path, params: dict[str, Any]) -> list[str]:
    """The notebooks (NN) a run folder has finished with these parameters, in order, stopping at the first not done."""
    if not (folder / "params.yaml").is_file():
        return []
    try:
        saved = saved_parameters(folder)
    except runs.UnreadableFile as e:
        raise SystemExit(f"{e}: what that run ran with is unknown; remove {folder} (or repair the file)") from None
    if saved != params:
        raise SystemExit(f"{folder} holds a run with other parameters; remove it, or give the sweep another --name")
    timings = runs.read_record_file(folder / "timings.json")
    done = []
    for nb in profiles.notebooks():
        if nb.stem not in timings:
            break
        done.append(nb.name[:2])
    return done


def copy_stages(source: Path, target: Path, stages: list[str]) -> None:
    """Copy `source`'s outputs of `stages` (and their executed notebooks, times and memory) into `target`."""
    target.mkdir(parents=True, exist_ok=True)
    for nn in stages:
        for pattern in STAGE_OUTPUTS[nn]:
            for path in sorted(source.glob(pattern)):
                dest = target / path.relative_to(source)
                dest.parent.mkdir(parents=True, exist_ok=True)
                if path.is_dir():
                    shutil.copytree(path, dest, dirs_exist_ok=True)
                else:
                    shutil.copy2(path, dest)
        for nb in (source / "notebooks").glob(f"{nn}_*.ipynb"):
            (target / "notebooks").mkdir(exist_ok=True)
            shutil.copy2(nb, target / "notebooks" / nb.name)
    for name in ("timings.json", "memory.json", "gpu_memory.json"):
        old = runs.read_record_file(source / name)
        kept = {k: v for k, v in old.items() if k[:2] in stages}
        if kept:
            runs.write_json(target / name, {**runs.read_record_file(target / name), **kept})


def unclaimed(folder: Path) -> list[str]:
    """Files of a run folder that no stage (STAGE_OUTPUTS) and no run-level file (RUN_FILES) claims."""
    claimed = [p for patterns in STAGE_OUTPUTS.values() for p in patterns] + RUN_FILES
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(fnmatch(str(rel), p) or str(rel).startswith(p + "/") for p in claimed):
            found.append(str(rel))
    return found


def selected(name: str, patterns: list[str]) -> bool:
    """Whether a run's name matches one of `--only`'s patterns (fnmatch: `*-s1`, `paper-*`)."""
    return any(fnmatch(name, pattern) for pattern in patterns)


class Sweep:
    """A planned sweep in `outputs/<name>/`: its runs, their state, and its record (sweep.json)."""

    def __init__(
        self,
        name: str,
        profile: str,
        runs_: list[Run],
        spec: dict[str, Any],
        record: Path | None = None,
        reuse: list[Path] = (),
    ):
        self.folder = runs.run_folder(name)
        self.name, self.profile, self.runs, self.spec, self.record = name, profile, runs_, spec, record
        self.declared = declared_parameters()
        for run in self.runs:  # every run's parameters checked before anything starts
            run.params = profiles.load_profile(profile, {**run.overrides, "run_name": run.name})
        self.elsewhere = []  # (folder, parameters) of finished runs of other sweeps (--reuse), also sources
        for where in reuse:
            for params_file in sorted(Path(where).glob("*/params.yaml")):
                try:
                    self.elsewhere.append((params_file.parent, saved_parameters(params_file.parent)))
                except runs.UnreadableFile as e:
                    log.warning("--reuse: %s; that run is not a source", e)
        self.state = runs.read_record_file(self.folder / SWEEP_FILE)
        planned = [r.name for r in self.runs]
        if self.state and [r["name"] for r in self.state.get("runs", [])] != planned:
            raise SystemExit(
                f"{self.folder} holds another sweep ({len(self.state.get('runs', []))} runs: "
                f"{', '.join(r['name'] for r in self.state.get('runs', [])[:4])}...); give this one another --name"
            )
        if not self.state:
            self.state = {
                "name": name,
                "profile": profile,
                **spec,
                "commit": (pipeline._git_state() or {}).get("commit"),
                "started": _now(),
                "runs": [
                    {
                        "name": r.name,
                        "variant": r.variant,
                        "seed": r.seed,
                        "overrides": r.overrides,
                        "status": "planned",
                    }
                    for r in self.runs
                ],
            }
        self.state.setdefault("sessions", []).append({"started": _now(), "commit": pipeline._git_state()})

    def candidates(self, upto: int) -> list[tuple[Path, dict[str, Any]]]:
        """(folder, parameters) of the runs another may copy from: this sweep's first `upto`, and --reuse's."""
        return [(self.folder / other.name, other.params) for other in self.runs[:upto]] + self.elsewhere

    def source_for(self, run: Run, upto: int, done: list[str]) -> tuple[Path | None, list[str]]:
        """The run folder (an earlier run of this sweep, or one of --reuse) whose finished notebooks equal the
        most of those `run` has still to do, in order from the next one, and those notebooks."""
        need = [nn for nn in sorted(self.declared) if nn not in done]
        mine = stage_keys(run.params, self.declared, self.folder / run.name)
        best: tuple[Path | None, list[str]] = (None, [])
        for folder, params in self.candidates(upto):
            theirs, finished = stage_keys(params, self.declared, folder), done_notebooks(folder, params)
            shared = []
            for nn in need:
                if nn not in finished or theirs[nn] is None or theirs[nn] != mine[nn]:
                    break
                shared.append(nn)
            if len(shared) > len(best[1]):
                best = (folder, shared)
        return best

    def results_source(self, run: Run, upto: int) -> Path | None:
        """A finished run (of this sweep or --reuse) with the same notebooks 01-04 and test problems as `run`, whose
        evaluation results `run` can start from; None if there is none."""
        last = sorted(self.declared)[-1]
        mine = stage_keys(run.params, self.declared, self.folder / run.name)
        test = self.folder / run.name / PROBLEM_FILES[last]
        before = [nn for nn in sorted(self.declared) if nn != last]
        for folder, params in self.candidates(upto):
            theirs, finished = stage_keys(params, self.declared, folder), done_notebooks(folder, params)
            if (
                evaluated_on(folder, test)
                and set(before) <= set(finished)
                and all(theirs[nn] is not None and theirs[nn] == mine[nn] for nn in before)
            ):
                return folder
        return None

    def student_results_source(self, run: Run, upto: int) -> Path | None:
        """A finished run (of this sweep or --reuse) with the same test problems as `run` and the same notebook 05
        parameters but for those of the DPO student: its untrained student's results are `run`'s too. None if
        there is none. (Notebook 05 checks each model's settings against those its results were made with.)"""
        last = sorted(self.declared)[-1]
        test = self.folder / run.name / PROBLEM_FILES[last]
        same = sorted(self.declared[last] - NOT_READ_BY_STUDENT)
        for folder, params in self.candidates(upto):
            if (
                evaluated_on(folder, test)
                and last in done_notebooks(folder, params)
                and all(params.get(k) == run.params.get(k) for k in same)
            ):
                return folder
        return None

    def save(self) -> None:
        runs.write_json(self.folder / SWEEP_FILE, self.state)
        if self.record:
            runs.write_json(self.record / SWEEP_FILE, self.state)

    def record_run(self, run: Run) -> None:
        if not self.record:
            return
        for rel in RECORDED:
            path = self.folder / run.name / rel
            if path.is_file():
                dest = self.record / run.name / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
        results = self.folder / run.name / "eval" / "results.jsonl"
        if results.is_file():  # each problem's outcome, not the chains: two runs' models compared problem by problem
            outcomes = compare.problem_outcomes(results)
            runs.write_json(self.record / run.name / compare.OUTCOMES, outcomes)

    def run_all(self, only: list[str] | None = None) -> list[str]:
        """Run every run not yet finished, in order; returns the names of those that failed.

        `only`: run-name patterns (fnmatch, e.g. `*-s1`, `paper-*`); runs matching none are left for a later call.

        For each run: copy what another run has finished and shares with it; with nothing to copy,
        run notebook 01 alone first (seconds), since the problems it writes may let later notebooks
        be copied; then run what is left.
        """
        os.environ["FCLIB_OUTPUTS"] = str(self.folder)  # the runs' folders, for this process and the kernels
        failed = []
        all_nn = [nb.name[:2] for nb in profiles.notebooks()]
        t_sweep = time.perf_counter()
        for i, run in enumerate(self.runs):
            entry, folder = self.state["runs"][i], self.folder / run.name
            where = f"[sweep {i + 1}/{len(self.runs)}] {run.name}"
            if only and not selected(run.name, only):
                log.info("%s: not in --only, left for later", where)
                continue
            done = done_notebooks(folder, run.params)
            if done == all_nn:
                log.info("%s: done before, kept", where)
                entry["status"] = "done"
                self.record_run(run)
                continue
            entry["status"] = "running"
            self.save()
            t0 = time.perf_counter()
            try:
                self.run_one(run, i, entry, where, done, all_nn)
                entry["status"] = "done"
            except (SystemExit, runs.RunInUse) as e:  # a notebook failed: recorded, and the sweep goes on
                entry["status"], entry["error"] = "failed", str(e)[:2000]
                failed.append(run.name)
                log.error("%s failed: %s", where, e)
            entry["wall_s"] = round(entry.get("wall_s", 0) + time.perf_counter() - t0, 1)
            entry["timings"] = runs.read_record_file(folder / "timings.json")
            self.record_run(run)
            self.save()
        self.state["wall_s"] = round(self.state.get("wall_s", 0) + time.perf_counter() - t_sweep, 1)
        self.save()
        return failed

    def run_one(self, run: Run, i: int, entry: dict[str, Any], where: str, done: list[str], all_nn: list[str]) -> None:
        """Finish one run of the sweep, holding its folder: copy what others share with it, run the rest."""
        folder = self.folder / run.name
        with runs.lock_run(folder, f"sweep {self.name}, run {run.name}"):
            while done != all_nn:
                source, shared = self.source_for(run, i, done)
                if shared:
                    copy_stages(source, folder, shared)
                    runs.write_yaml(folder / "params.yaml", run.params)
                    name = source.name if source.parent == self.folder else str(source)
                    reused = entry.setdefault("reused", [])
                    if reused and reused[-1]["from"] == name:
                        reused[-1]["notebooks"] += shared
                    else:
                        reused.append({"from": name, "notebooks": shared})
                    log.info("%s: notebooks %s-%s copied from %s", where, shared[0], shared[-1], name)
                    done = done_notebooks(folder, run.params)
                    continue
                start = all_nn[len(done)]
                stop = start if not done else None  # notebook 01 alone, then look again
                if done and not (folder / EVAL_RESULTS[0]).exists():  # 01 has written the test problems
                    self.start_from_results(run, i, entry, where)
                log.info("%s: running notebooks %s-%s", where, start, stop or all_nn[-1])
                pipeline.run(run.params, start=start, stop=stop)
                before, done = done, done_notebooks(folder, run.params)
                if len(done) <= len(before):
                    raise SystemExit(f"notebook {start} ran but {folder / 'timings.json'} does not say so")

    def start_from_results(self, run: Run, i: int, entry: dict[str, Any], where: str) -> None:
        """Before notebook 05 first runs: copy the evaluation results of a run that shares notebooks 01-04 and the
        test problems (results_source), else those of the untrained student from a run that shares the test
        problems and notebook 05's parameters (student_results_source). Notebook 05 evaluates what they lack."""
        target = self.folder / run.name
        source, models = self.results_source(run, i), None
        if source is None:
            source = self.student_results_source(run, i)
            models = [m for m in STUDENT_MODELS if m in run.params["eval_models"]]
            if source is None or not models:
                return
        (target / "eval").mkdir(parents=True, exist_ok=True)
        if models is None:
            for rel in EVAL_RESULTS:
                shutil.copy2(source / rel, target / rel)
        else:
            results, meta = (source / rel for rel in EVAL_RESULTS)
            kept = [r for r in runs.read_jsonl(results) if r["source"] in models]
            runs.write_atomic(target / EVAL_RESULTS[0], "".join(runs.jsonl_line(r) for r in kept))
            sources = json.loads(meta.read_text())["sources"]
            runs.write_json(target / EVAL_RESULTS[1], {"sources": {m: sources[m] for m in models if m in sources}})
        name = source.name if source.parent == self.folder else str(source)
        reused = {"from": name, "notebooks": [], "files": EVAL_RESULTS}
        entry.setdefault("reused", []).append(reused if models is None else {**reused, "models": models})
        log.info(
            "%s: notebook 05 starts from the results of %s (%s; it evaluates only the models they lack)",
            where,
            name,
            "all models" if models is None else "the untrained student",
        )

    def compare(self) -> Path:
        """Notebook 06 on this sweep's runs, executed into the sweep folder."""
        pm = pipeline.import_papermill()
        target = self.folder / COMPARE_NOTEBOOK.name
        pm.execute_notebook(
            str(COMPARE_NOTEBOOK),
            str(target),
            parameters={"runs_folder": str(self.folder)},
            cwd=str(profiles.NOTEBOOKS),
            kernel_name=pipeline.KERNEL,
            progress_bar=False,
        )
        if self.record:  # the figures; the executed notebook becomes a page (scripts/publish_notebooks.py)
            for fig in (self.folder / "figures").glob("*.png"):
                (self.record / "figures").mkdir(exist_ok=True)
                shutil.copy2(fig, self.record / "figures" / fig.name)
        return target


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_variants(path: Path) -> dict[str, dict[str, Any]]:
    """{name: overrides} from a YAML file mapping each variant's name to the parameters it changes."""
    try:
        variants = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"--variants {path}: {e}") from None
    if not isinstance(variants, dict) or not all(
        isinstance(k, str) and isinstance(v, dict | type(None)) for k, v in variants.items()
    ):
        raise SystemExit(f"--variants {path}: a mapping of variant name to {{parameter: value}}, one per variant")
    for name in variants:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,40}", name):
            raise SystemExit(f"--variants {path}: variant name {name!r} must be letters, digits, '.', '+', '_', '-'")
    return {k: dict(v or {}) for k, v in variants.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fclib.sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu", help="profiles/NAME.yaml every run starts from")
    ap.add_argument("--seeds", default="0", help="seeds: 0-4, or 0,2,5 (default 0)")
    ap.add_argument("-p", dest="axes", action="append", default=[], metavar="KEY=V1,V2", help="a grid axis")
    ap.add_argument("--variants", type=Path, help="YAML file: {variant name: {parameter: value}}")
    ap.add_argument("--name", help="folder under outputs/ (default: <profile>-sweep)")
    ap.add_argument("--record", type=Path, help="also copy each run's results and sweep.json into this folder")
    ap.add_argument(
        "--reuse",
        type=Path,
        action="append",
        default=[],
        metavar="FOLDER",
        help="another sweep's folder: its finished stages are copied where they equal a run's",
    )
    ap.add_argument(
        "--only",
        metavar="PATTERNS",
        help="run only the runs whose names match one of these comma-separated patterns (say 'paper-*,*-s1'); "
        "the others are left as they are, for a later call without --only",
    )
    ap.add_argument("--no-compare", action="store_true", help="do not run notebook 06 at the end")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    axes: dict[str, list[Any]] = {}
    for item in args.axes:
        if "=" not in item:
            raise SystemExit(f"-p expects KEY=V1,V2, got {item!r}")
        key, values = item.split("=", 1)
        axes[key.strip()] = split_values(values)
    variants = read_variants(args.variants) if args.variants else None
    spec = {"seeds": parse_seeds(args.seeds), "axes": axes, "variants": variants}
    spec["reuse"] = [str(p) for p in args.reuse]
    name = args.name or f"{args.profile}-sweep"
    sweep = Sweep(name, args.profile, grid(spec["seeds"], axes, variants), spec, args.record, args.reuse)
    log.info("sweep %s: %d runs into %s", sweep.name, len(sweep.runs), sweep.folder)
    t0 = time.perf_counter()
    only = [p.strip() for p in args.only.split(",") if p.strip()] if args.only else None
    if only and not any(selected(r.name, only) for r in sweep.runs):
        raise SystemExit(f"--only {args.only}: no run of the sweep matches ({', '.join(r.name for r in sweep.runs)})")
    try:
        with runs.lock_run(sweep.folder, f"sweep {sweep.name}"):
            failed = sweep.run_all(only)
            if not args.no_compare and len(sweep.runs) > len(failed):
                log.info("sweep %s: comparing the runs (notebook 06)", sweep.name)
                sweep.compare()
    except runs.RunInUse as e:
        raise SystemExit(str(e)) from None
    minutes, seconds = divmod(round(time.perf_counter() - t0), 60)
    done = sum(entry["status"] == "done" for entry in sweep.state["runs"])  # runs left out by --only are not
    print(
        f"sweep {sweep.name}: {done} of {len(sweep.runs)} runs done in {minutes} min {seconds} s; "
        f"record: {sweep.folder / SWEEP_FILE}"
    )
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (each run's error is in {sweep.folder / SWEEP_FILE})")


if __name__ == "__main__":
    main()
