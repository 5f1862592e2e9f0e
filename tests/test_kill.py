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


@pytest.mark.slow
def test_every_notebook_killed_at_several_points_reruns_to_the_same_outputs(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = subprocess.run(_command(), env=_env(reference), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
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


def _server_processes() -> set[int]:
    return {p.pid for p in psutil.process_iter(["cmdline"]) if "serve" in (p.info["cmdline"] or [])}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "sigterm", "sigkill"])
def test_the_served_teacher_dies_with_the_pipeline(tmp_path, sig):
    """The smoke profile serves its teacher with `transformers serve`: however the pipeline ends, nothing it
    started (its kernel, the server) lives on holding memory and a port."""
    before = _server_processes()
    command = [sys.executable, "-m", "fclib.pipeline", "--profile", "smoke", "--to", "02", "-p", "fol_train=3"]
    proc = subprocess.Popen(command, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    gone, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, f"outlived the pipeline ({sig.name}): {[p.cmdline()[:4] for p in alive]}"
    assert not (_server_processes() - before)
    shutil.rmtree(tmp_path, ignore_errors=True)
