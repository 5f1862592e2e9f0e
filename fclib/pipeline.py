"""The study as one papermill pipeline: `python -m fclib.pipeline --profile NAME`.

Runs the numbered notebooks in order into `outputs/<run_name>/notebooks/`, passing one set of
parameters to all of them (each notebook receives the ones its `parameters` cell declares),
and stops at the first failing notebook, streaming each notebook's output to the terminal. Writes
`params.yaml`, `env.json` (packages, machine, commit), and the wall time and peak memory of each
notebook (`timings.json`, `memory.json`, and `gpu_memory.json` where nvidia-smi is) beside them.
"""

from __future__ import annotations

import argparse
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
from fclib.models import hub_fault, hub_id, in_hub_cache
from fclib.profiles import NOTEBOOK_PROFILE_ENV, NOTEBOOKS, changed_under, load_profile, notebooks
from fclib.runs import PROJECT_ROOT, TEXT_PROGRESS_ENV
from fclib.tasks import gsm8k

KERNEL = "fclib"  # the Jupyter kernel scripts/setup.sh installs (.venv's Python)
log = logging.getLogger(__name__)


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


def import_papermill() -> Any:
    """papermill, imported without an import-time cost that nothing here uses.

    papermill imports nbformat, nbformat imports jsonschema, and jsonschema's format checkers import
    `rfc3987_syntax` where it is installed (JupyterLab's jupyter-events asks for it): that module builds
    a Lark parser as it is imported, 1.6 s on 2 cores, in every pipeline process. nbformat validates
    notebooks without checking formats, so jsonschema is imported here with that one checker left out;
    the module stays importable afterwards, and the kernels never import jsonschema.
    """
    blocked = "jsonschema" not in sys.modules and "rfc3987_syntax" not in sys.modules
    if blocked:
        sys.modules["rfc3987_syntax"] = None  # type: ignore[assignment]  # an ImportError, which jsonschema expects
    try:
        import papermill
    finally:
        if blocked:
            del sys.modules["rfc3987_syntax"]
    return papermill


def run(params: dict[str, Any], start: str | None = None, stop: str | None = None) -> Path:
    """Execute the notebooks with papermill; returns the run folder.

    Each notebook's output (its prints and progress bars, as text) streams to this process's
    stdout and stderr while it runs. The wall time and peak memory of each notebook go to
    `timings.json` and `memory.json`. The run folder is held for the whole run (`runs.lock_run`):
    a second run on it is refused. Starting `--from` a later notebook is refused where the
    parameters changed for a notebook it skips whose results the run holds.
    """
    pm = import_papermill()
    todo = notebooks(start, stop)
    go_offline_unless_needed(params)
    try:
        run_folder = runs.run_folder(params["run_name"])
        (run_folder / "notebooks").mkdir(exist_ok=True)
    except OSError as e:  # read-only, not a folder, no permission
        raise SystemExit(
            f"cannot write to {e.filename or runs.outputs_root()}: {e.strerror}. Make it writable, or set "
            "FCLIB_OUTPUTS to a folder you can write to"
        ) from None
    try:
        with runs.lock_run(run_folder, f"pipeline {params['run_name']}"):
            _check_skipped(run_folder, params, todo)
            runs.write_yaml(run_folder / "params.yaml", params)
            runs.write_json(run_folder / "env.json", environment())
            os.environ.pop(NOTEBOOK_PROFILE_ENV, None)  # the kernels papermill starts use the injected parameters
            os.environ[TEXT_PROGRESS_ENV] = "1"  # progress bars as text, so they reach the terminal
            os.environ.setdefault("TQDM_MININTERVAL", "5")  # and update every few seconds, not every 0.1 s
            for i, nb in enumerate(todo, 1):
                _run_notebook(pm, nb, params, run_folder, f"[{i}/{len(todo)}]")
    except runs.RunInUse as e:
        raise SystemExit(str(e)) from None
    return run_folder


def _check_skipped(run_folder: Path, params: dict[str, Any], todo: list[Path]) -> None:
    """Refuse a start past notebooks whose results were made with other values than `params` (they would not be
    redone, and params.yaml would claim values they were not made with)."""
    skipped = [nb.name[:2] for nb in notebooks() if nb.name[:2] < todo[0].name[:2]]
    if not skipped:
        return
    try:
        old = runs.read_mapping(run_folder / "params.yaml")
    except runs.UnreadableFile as e:
        raise SystemExit(f"{e}: the run's earlier notebooks cannot be checked; run it from 01") from None
    changed = changed_under(run_folder, old, params, stages=skipped) if old is not None else []
    if changed:
        raise SystemExit(
            f"--from {todo[0].name[:2]} skips notebooks that read parameters this run changes:\n- "
            + "\n- ".join(changed)
            + "\nrun from the first notebook that reads them, or choose another --run-name"
        )


def _run_notebook(pm: Any, nb: Path, params: dict[str, Any], run_folder: Path, where: str) -> None:
    """One notebook with papermill, its time and peak memory recorded; a failure is one message, not a traceback."""
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    declared = pm.inspect_notebook(str(nb))
    given = {k: v for k, v in params.items() if k in declared}
    target = run_folder / "notebooks" / nb.name
    log.info("%s %s: running (executed copy: %s)", where, nb.stem, target)
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
    except DeadKernelError:
        raise SystemExit(
            f"{nb.name}: the notebook's kernel died (out of memory, or killed); run the same command again to carry "
            f"on where it stopped. The executed notebook is at {target}"
        ) from None
    except CellTimeoutError as e:
        raise SystemExit(
            f"{nb.name}: a cell ran past its time limit ({e}); the executed notebook is at {target}"
        ) from None
    timings = runs.read_record_file(run_folder / "timings.json")
    memory = runs.read_record_file(run_folder / "memory.json")
    timings[nb.stem], memory[nb.stem] = round(time.perf_counter() - t0, 1), peak.peak_gib
    runs.write_json(run_folder / "timings.json", timings)
    runs.write_json(run_folder / "memory.json", memory)
    if peak.peak_gpu_gib is not None:
        gpu_memory = runs.read_record_file(run_folder / "gpu_memory.json")
        gpu_memory[nb.stem] = peak.peak_gpu_gib
        runs.write_json(run_folder / "gpu_memory.json", gpu_memory)
    log.info("%s %s: done in %.0f s, peak memory %.2f GiB", where, nb.stem, timings[nb.stem], peak.peak_gib)


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
    notebooks(args.start, args.stop)  # a bad --from or --to stops before anything else
    params = load_profile(args.profile, overrides)
    t0 = time.perf_counter()
    try:
        run_folder = run(params, args.start, args.stop)
    except KeyboardInterrupt:  # Ctrl-C: the kernel and any server went with it; what was done is kept
        # the notebook client's tasks left pending fail as its kernel goes ("Kernel died"); asyncio would log them,
        # traceback and all, when they are collected at exit, after the line below: they are the interruption itself
        logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
        print(
            f"interrupted: run {params['run_name']!r} keeps what its notebooks finished; "
            "the same command carries on where it stopped",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    minutes, seconds = divmod(round(time.perf_counter() - t0), 60)
    peak = max(runs.read_record_file(run_folder / "memory.json").values(), default=0)
    print(
        f"done in {minutes} min {seconds} s (peak memory {peak:.2f} GiB): "
        f"the results of run {params['run_name']!r} are in {run_folder}"
    )


if __name__ == "__main__":
    main()
