"""Seconds per DPO step: fclib's training now, next to fclib at a baseline commit and a plain TRL script.

All arms train the same LoRA adapter (rank 16, all linear layers) on the same preference pairs,
with the same model, loss and DPOConfig settings, each in its own process so that its peak memory
is its own:

- `plain`: a plain TRL script, `DPOTrainer(model, args=DPOConfig(...), peft_config=LoraConfig(...))`;
- `baseline`: `fclib.train.train(...)` as it was at `--baseline` (default bd141ea), its code taken
  from this repository's history (`git archive`) into a temporary folder;
- `fclib`: `fclib.train.train(...)` at this commit, with its defaults (fp32 on a CPU: exact);
- `fclib+bf16`: the same with `train_precision='bf16'` (the frozen base in bfloat16, the adapter in
  fp32: inexact, a switch; faster matrix products where the CPU computes bfloat16 natively);
- `fclib+precompute`: the same with `precompute_ref=True` (reference log-probs computed once);
- `fclib-4bit`: fclib's QLoRA path (4-bit nf4 student, bf16 compute, gradient checkpointing): CUDA only,
  among the default arms only where CUDA is.

The pairs are FOL first-divergence pairs (reference chain chosen, a wrong chain rejected), or
the pairs of a run with `--pairs outputs/<run>/pairs`. Steps after the first are timed.

    python benchmarks/training.py [--model embedded] [--steps 6] [--batch 4] [--baseline bd141ea]

The last lines give each fclib arm's speed-up against the baseline, in seconds per step
(`speed-up fclib+bf16 / baseline: 2.4x`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("plain", "baseline", "fclib", "fclib+bf16", "fclib+precompute", "fclib-4bit")
BASELINE = "bd141ea"  # the commit whose training the speed-up is measured against (issue 31)


def make_pairs(folder: Path, problems: int = 24) -> Path:
    from fclib.agent import AgentConfig, run_chains
    from fclib.backends.scripted import ScriptedBackend
    from fclib.pairs import build_pairs, save_pairs
    from fclib.tasks import TASKS, fol, reference_script

    records = []
    for p in fol.generate(problems, seed=11, nmax=6, split="train"):
        ref = reference_script(p)
        for sample, script in enumerate((ref, [ref[0], f"answer(value={not p.answer})"])):
            (c,) = run_chains(
                ScriptedBackend({p.question: script}, "teacher"),
                TASKS,
                [p],
                AgentConfig(),
                samples=[sample],
                progress=False,
            )
            records.append(c.to_dict())
    save_pairs(build_pairs(records, strategy="first_divergence", validation_share=0), folder)
    return folder


def run_arm(arm: str, pairs: str, model: str, steps: int, batch: int) -> dict:
    """One arm in this process: seconds per step after the first, peak memory."""
    import torch
    from transformers import TrainerCallback

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    out = tempfile.mkdtemp(prefix="fclib-bench-")
    common = dict(
        max_steps=steps,
        batch_size=batch,
        max_length=2048,
        learning_rate=2e-4,
        beta=0.1,
        loss_type=["sigmoid", "sft"],
        save_steps=10**6,
        eval_steps=10**6,
        seed=0,
    )
    if arm == "plain":
        from peft import LoraConfig
        from trl import DPOConfig, DPOTrainer

        from fclib.models import load_model
        from fclib.pairs import load_pairs

        m, tok = load_model(model)
        cuda = torch.cuda.is_available()
        args = DPOConfig(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=batch,
            learning_rate=2e-4,
            beta=0.1,
            loss_type=["sigmoid", "sft"],
            max_length=2048,
            bf16=False,
            use_cpu=not cuda,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            seed=0,
            data_seed=0,
        )
        peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = DPOTrainer(
            model=m,
            args=args,
            train_dataset=load_pairs(pairs)["train"],
            processing_class=tok,
            peft_config=peft,
            callbacks=[Clock()],
        )
        trainer.train()
    else:
        from fclib.train import TrainSettings, train

        options = {
            "quantization": "4bit" if arm == "fclib-4bit" else "none",
            "precompute_ref": arm.endswith("precompute"),
        }
        if arm == "fclib+bf16":
            options["precision"] = "bf16"
        train(pairs, out, TrainSettings(student=model, **options, **common), resume=False, callbacks=[Clock()])
    peak = (
        torch.cuda.max_memory_allocated()
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    import fclib

    return {
        "arm": arm,
        "s_per_step": sum(times[1:]) / max(1, len(times) - 1),
        "steps": len(times),
        "peak_bytes": peak,
        "code": str(Path(fclib.__file__).parent),
    }


def baseline_code(commit: str) -> str:
    """A temporary folder holding the package `fclib` as it was at `commit` (from this repository's history)."""
    root = Path(__file__).resolve().parent.parent
    target = Path(tempfile.mkdtemp(prefix=f"fclib-{commit}-"))
    archive = subprocess.run(["git", "archive", commit, "fclib"], cwd=root, capture_output=True, check=False)
    if archive.returncode:
        raise SystemExit(
            f"cannot take fclib at {commit} from {root}'s history: {archive.stderr.decode().strip()} "
            "(a shallow clone lacks it: git fetch --unshallow; or leave the baseline out: --arms plain fclib)"
        )
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return str(target)


def main() -> None:
    import os

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--pairs", help="a pairs/ folder of a run (default: FOL pairs made here)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4, help="pairs per step (the cpu profile's train_batch_size)")
    ap.add_argument("--baseline", default=BASELINE, help="the commit of the 'baseline' arm (default %(default)s)")
    ap.add_argument("--arms", nargs="+", choices=ARMS, help="arms to run (default: all; fclib-4bit only with CUDA)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    args = ap.parse_args()
    if args.arm:
        print("RESULT " + json.dumps(run_arm(args.arm, args.pairs, args.model, args.steps, args.batch)))
        return

    import torch

    cuda = torch.cuda.is_available()
    arms = args.arms or [a for a in ARMS if cuda or a != "fclib-4bit"]
    if "fclib-4bit" in arms and not cuda:
        raise SystemExit("the arm fclib-4bit (QLoRA) needs a CUDA GPU and none is visible: leave it out of --arms")
    baseline = baseline_code(args.baseline) if "baseline" in arms else None
    pairs = args.pairs or str(make_pairs(Path(tempfile.mkdtemp(prefix="fclib-pairs-"))))

    from fclib.pairs import load_pairs

    n = load_pairs(pairs)["train"].num_rows
    device = f"cuda {torch.cuda.get_device_name(0)}" if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"model {args.model}, {n} pairs, batch {args.batch}, {args.steps} steps (first one not timed), {device}")
    results = {}
    for arm in arms:
        env = dict(os.environ)
        if arm == "baseline":  # fclib's code at the baseline commit, first on the path
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [baseline, env.get("PYTHONPATH")]))
        cmd = [sys.executable, __file__, "--arm", "fclib" if arm == "baseline" else arm, "--pairs", pairs]
        cmd += ["--model", args.model, "--steps", str(args.steps), "--batch", str(args.batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"arm {arm} failed:\n{proc.stderr[-3000:]}")
        r = results[arm] = {**json.loads(line[7:]), "arm": arm}
        if arm == "baseline" and not r["code"].startswith(baseline):
            raise SystemExit(f"the baseline arm ran {r['code']}, not fclib at {args.baseline}")
        print(f"{arm:<18} {r['s_per_step']:7.2f} s/step   peak memory {r['peak_bytes'] / 2**30:5.2f} GiB", flush=True)
    for name, reference in (("plain TRL", "plain"), (f"baseline ({args.baseline})", "baseline")):
        for arm in (a for a in results if a.startswith("fclib") and reference in results):
            ratio = results[reference]["s_per_step"] / results[arm]["s_per_step"]
            print(f"speed-up {arm} / {name}: {ratio:.2f}x")
    if args.json:  # a record for docs/benchmarks/ (scripts/measured.py): what ran, where and at which commit
        root = Path(__file__).resolve().parent.parent
        git = ["git", "-C", str(root)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        record = {
            "commit": commit + ("+changes" if dirty.stdout.strip() else ""),
            "command": " ".join(["python benchmarks/training.py", *sys.argv[1:]]),
            "device": device,
            "pairs": n,
            "batch": args.batch,
            "steps": args.steps,
            "arms": results,
        }
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
