"""A run killed at any point of any notebook carries on to the outputs of a run never interrupted.

The README promises that `./study.sh` is safe to run again and that a killed run carries on where
it stopped. Here each study notebook is killed (SIGKILL, the pipeline and its kernel at once) at
several points of its work, picked by what the run folder shows (a cell finished, a ledger's line
written, a checkpoint or a result file appearing), started again each time, and finally let to
finish: its outputs must equal those of a run that was never interrupted. The smoke profile with
the teacher in process is deterministic (seeded per chain), so they are equal record for record.
The served teacher's own test follows: it dies with the pipeline, however the pipeline ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from fclib.runs import PROJECT_ROOT, jsonl_lines

# the smoke profile made small and deterministic: a teacher in process, a checkpoint at every step
SMALL = ["teacher_backend=inprocess", "save_steps=1", "fol_train=3", "gsm8k_train=3", "fol_test=2", "gsm8k_test=2"]
Trigger = Callable[[Path], bool]


def _command(*extra: str) -> list[str]:
    overrides = [arg for item in SMALL for arg in ("-p", item)]
    return [sys.executable, "-m", "fclib.pipeline", "--profile", "smoke", *overrides, *extra]


def _env(outputs: Path) -> dict[str, str]:
    return {**os.environ, "FCLIB_OUTPUTS": str(outputs)}


def cells(nn: str, k: int) -> Trigger:
    """The executed copy of notebook NN has finished k code cells (papermill saves it after each)."""

    def fired(run: Path) -> bool:
        path = next((run / "notebooks").glob(f"{nn}_*.ipynb"), None)
        try:
            nb = json.loads(path.read_text()) if path else None
        except (OSError, ValueError):  # being written
            return False
        done = [c for c in (nb or {}).get("cells", []) if c.get("metadata", {}).get("papermill", {}).get("end_time")]
        return len(done) >= k

    return fired


def lines(rel: str, n: int) -> Trigger:
    """The file has at least n whole lines."""

    def fired(run: Path) -> bool:
        path = run / rel
        return path.is_file() and path.read_bytes().count(b"\n") >= n

    return fired


def exists(pattern: str) -> Trigger:
    return lambda run: any(run.glob(pattern))


KILL_POINTS: dict[str, list[Trigger]] = {
    "01": [cells("01", 3), exists("figures/gsm8k_reference_coverage.png"), exists("problems/test.jsonl")],
    "02": [lines("chains/chains.jsonl", 1), lines("chains/chains.jsonl", 7), exists("chains/steps.jsonl")],
    "03": [cells("03", 3), exists(".pairs.new-*"), exists("pairs/train.jsonl")],
    "04": [exists("model/checkpoints/checkpoint-1"), exists("model/checkpoints/checkpoint-2"), exists("model/adapter")],
    "05": [lines("eval/results.jsonl", 1), exists("eval/metrics.json"), exists("report.md")],
}


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        return []


def _kill_when(proc: subprocess.Popen, run: Path, trigger: Trigger, timeout: float = 300) -> bool:
    """SIGKILL the pipeline and everything it started once `trigger` fires; False when the run ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if trigger(run):
            for p in reversed(_tree(proc)):  # the kernel too, at once: a kill of the machine's own
                try:
                    p.kill()
                except psutil.Error:
                    pass
            proc.wait(30)
            return True
        time.sleep(0.05)
    assert proc.poll() is not None, "the run neither reached its kill point nor ended"
    return False


def _records(path: Path) -> list[str]:
    """A ledger's records without what differs between identical runs (timing, retries), in a stable order."""
    out = []
    for raw in jsonl_lines(path.read_bytes()):
        if raw.strip():
            record = {k: v for k, v in json.loads(raw).items() if k not in ("latency_s", "retries")}
            out.append(json.dumps(record, sort_keys=True))
    return sorted(out)


def _outputs(run: Path, nn: str) -> dict[str, object]:
    """What notebook NN leaves that a rerun must reproduce exactly."""
    if nn == "01":
        return {rel: (run / rel).read_bytes() for rel in ("problems/train.jsonl", "problems/test.jsonl")}
    if nn == "02":
        summary = json.loads((run / "chains" / "summary.json").read_text())
        return {
            "chains": _records(run / "chains" / "chains.jsonl"),
            "steps": _records(run / "chains" / "steps.jsonl"),
            "summary": {k: summary[k] for k in ("outcomes", "yield", "step_verdicts")},
        }
    if nn == "03":
        return {rel: (run / rel).read_bytes() for rel in ("pairs/train.jsonl", "pairs/validation.jsonl")}
    if nn == "04":
        record = json.loads((run / "model" / "adapter" / "fclib_training.json").read_text())
        log = json.loads((run / "train" / "log_history.json").read_text())
        return {
            "adapter": (run / "model" / "adapter" / "adapter_model.safetensors").read_bytes(),
            "losses": [(e["step"], e["loss"]) for e in log if "loss" in e],
            "record": {k: record[k] for k in ("global_step", "fingerprint", "settings")},
        }
    return {"results": _records(run / "eval" / "results.jsonl"), "metrics": (run / "eval" / "metrics.json").read_text()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A run never interrupted (its outputs folder; the run is `smoke` inside it)."""
    outputs = tmp_path_factory.mktemp("reference")
    done = subprocess.run(_command(), env=_env(outputs), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return outputs


def _copy(reference: Path, tmp_path: Path) -> Path:
    shutil.copytree(reference / "smoke", tmp_path / "smoke")
    return tmp_path


@pytest.mark.slow
def test_every_notebook_killed_at_several_points_reruns_to_the_same_outputs(reference, tmp_path):
    killed = tmp_path / "killed"
    for nn, points in KILL_POINTS.items():
        landed = 0
        for trigger in points:
            proc = subprocess.Popen(
                _command("--from", nn, "--to", nn),
                env=_env(killed),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=PROJECT_ROOT,
            )
            landed += _kill_when(proc, killed / "smoke", trigger)
        again = subprocess.run(
            _command("--from", nn, "--to", nn), env=_env(killed), capture_output=True, text=True, timeout=900
        )
        assert again.returncode == 0, f"notebook {nn}, after {landed} kills:\n{again.stderr[-3000:]}"
        assert landed >= 2, f"notebook {nn}: only {landed} of {len(points)} kills landed before it ended"
        assert _outputs(killed / "smoke", nn) == _outputs(reference / "smoke", nn), (
            f"notebook {nn} after {landed} kills"
        )


def _interruptible() -> None:
    """Ctrl-C as at a terminal: a shell's background job (nohup ... &, some CI runners) starts with SIGINT
    ignored, which its children inherit, and then Python never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _server_processes() -> set[int]:
    return {p.pid for p in psutil.process_iter(["cmdline"]) if "serve" in (p.info["cmdline"] or [])}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "sigterm", "sigkill"])
def test_the_served_teacher_dies_with_the_pipeline(reference, tmp_path, sig):
    """The smoke profile serves its teacher with `transformers serve`: however the pipeline ends, nothing it
    started (its kernel, the server) lives on holding memory and a port. Notebook 02 alone, on the reference run's
    problems, with the teacher served and no chains yet."""
    shutil.rmtree(_copy(reference, tmp_path) / "smoke" / "chains")
    before = _server_processes()
    command = _command("--from", "02", "--to", "02", "-p", "teacher_backend=server")
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(
            command,
            env=_env(tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=_interruptible,
        )
    deadline = time.monotonic() + 300
    started: list[psutil.Process] = []
    while time.monotonic() < deadline and proc.poll() is None:
        started = _tree(proc)
        if _server_processes() - before and (tmp_path / "smoke" / "chains" / "server.log").is_file():
            break
        time.sleep(0.2)
    assert proc.poll() is None and _server_processes() - before, "the teacher's server never started"
    started = _tree(proc)
    proc.send_signal(sig)
    proc.wait(60)
    if sig == signal.SIGINT:  # one line saying what to do, not a traceback
        assert proc.returncode == 130 and (tmp_path / "stderr").read_text().strip().splitlines()[-1].startswith(
            "interrupted: run 'smoke' keeps what its notebooks finished"
        )
    gone, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, f"outlived the pipeline ({sig.name}): {[p.cmdline()[:4] for p in alive]}"
    assert not (_server_processes() - before)
    shutil.rmtree(tmp_path / "smoke", ignore_errors=True)


def _papermill(notebook: str, outputs: Path, **parameters: object) -> subprocess.CompletedProcess:
    """A notebook run as JupyterLab would run it: no profile variable, the cell's defaults but what is given."""
    env = {k: v for k, v in _env(outputs).items() if k != "FCLIB_NOTEBOOK_PROFILE"}
    code = (
        "import sys, papermill as pm; "
        f"pm.execute_notebook({str(PROJECT_ROOT / 'notebooks' / notebook)!r}, sys.argv[1], parameters={parameters!r}, "
        f"kernel_name='fclib', cwd={str(PROJECT_ROOT / 'notebooks')!r}, progress_bar=False)"
    )
    out = outputs / "executed.ipynb"
    return subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_notebook_opened_for_a_run_uses_that_runs_parameters(reference, tmp_path):
    """Retyping run_name in notebook 03 (its other parameters at the cpu profile's defaults) rebuilds the run's
    pairs with the run's own parameters; a value that contradicts the run's pairs is refused with the difference."""
    outputs = _copy(reference, tmp_path)
    before = (outputs / "smoke" / "pairs" / "train.jsonl").read_bytes()
    done = _papermill("03_build_preference_pairs.ipynb", outputs, run_name="smoke")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (outputs / "smoke" / "pairs" / "train.jsonl").read_bytes() == before
    assert "parameters of run 'smoke'" in (outputs / "executed.ipynb").read_text()

    refused = _papermill("03_build_preference_pairs.ipynb", outputs, run_name="smoke", pair_strategy="all")
    assert refused.returncode != 0 and "RunParametersError" in refused.stderr
    assert "pair_strategy: 'first_divergence' in the run, 'all' here (pairs/ made with the first)" in refused.stderr
    assert (outputs / "smoke" / "pairs" / "train.jsonl").read_bytes() == before


@pytest.mark.slow
def test_changing_the_problems_under_a_run_name_keeps_every_notebook_to_the_current_ones(reference, tmp_path):
    from fclib.problems import read_problems

    outputs = _copy(reference, tmp_path)
    done = subprocess.run(_command("-p", "fol_train=2"), env=_env(outputs), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    run = outputs / "smoke"
    train = {p.id for p in read_problems(run / "problems" / "train.jsonl")}
    assert sum(i.startswith("fol") for i in train) == 2
    summary = json.loads((run / "chains" / "summary.json").read_text())
    assert summary["yield"]["teacher"]["fol"]["problems"] == 2  # the chains of the dropped problem stay out
    pairs = [json.loads(line) for line in jsonl_lines((run / "pairs" / "train.jsonl").read_bytes()) if line]
    assert pairs and {p["problem_id"] for p in pairs} <= train


@pytest.mark.slow
def test_a_second_run_on_a_run_folder_is_refused_in_one_line(tmp_path):
    first = subprocess.Popen(
        _command("--to", "02"), env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    lock = tmp_path / "smoke" / ".lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and str(first.pid) in lock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    second = subprocess.run(_command(), env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    still = first.poll() is None
    first.kill()
    first.wait(30)
    for p in psutil.Process().children(recursive=True):
        p.kill()
    assert still, "the first run ended before the second started"
    assert second.returncode == 1
    (line,) = second.stderr.strip().splitlines()
    assert f"is in use by process {first.pid} (pipeline smoke" in line and "choose another run name" in line


@pytest.mark.slow
def test_a_dead_kernel_is_one_message_not_a_traceback(tmp_path):
    proc = subprocess.Popen(
        _command("--to", "01"), env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline, kernel = time.monotonic() + 120, None
    while kernel is None and time.monotonic() < deadline and proc.poll() is None:
        kernel = next((p for p in _tree(proc)[1:] if "ipykernel_launcher" in " ".join(p.cmdline())), None)
        time.sleep(0.2)
    assert kernel is not None, "no kernel started"
    time.sleep(2)
    kernel.kill()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "01_define_tools.ipynb: the notebook's kernel died" in err and "Traceback" not in err, err[-2000:]


@pytest.mark.slow
def test_a_teacher_reply_holding_line_separators_does_not_stop_notebook_02(reference, tmp_path):
    """U+2028, U+2029 or U+0085 in a reply once made notebook 02 fail on every rerun: it split lines as
    `str.splitlines` does, the writer only at \\n."""
    from fclib.runs import jsonl_line

    outputs = _copy(reference, tmp_path)
    path = outputs / "smoke" / "chains" / "chains.jsonl"
    records = [json.loads(raw) for raw in jsonl_lines(path.read_bytes()) if raw.strip()]
    teacher = next(r for r in records if r["source"] == "teacher")
    turn = teacher["messages"][teacher["n_prompt"]]
    turn["content"] = "\u2028".join([turn["content"], "\u2029", "\u0085"])
    path.write_text("".join(jsonl_line(r) for r in records))
    done = subprocess.run(
        _command("--from", "02", "--to", "02"), env=_env(outputs), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\u2028" in path.read_text() and not list(path.parent.glob("*.damaged"))
