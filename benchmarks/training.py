"""Seconds per DPO step: fclib's training stage next to a plain TRL DPOTrainer script.

All arms train the same LoRA adapter (rank 16, all linear layers) on the same preference pairs,
with the same model and DPOConfig settings, each in its own process so that its peak memory
is its own:

- `plain`: a plain TRL script, `DPOTrainer(model, args=DPOConfig(...), peft_config=LoraConfig(...))`;
- `fclib`: `fclib.train.train(...)`, which scores only completion tokens on CPU as TRL does on CUDA;
- `fclib+precompute`: the same with `precompute_ref=True` (reference log-probs computed once);
- `fclib-4bit`: fclib's QLoRA path (4-bit nf4 student, bf16 compute, gradient checkpointing; CUDA only).

The pairs are FOL first-divergence pairs (reference chain chosen, a wrong chain rejected), or
the pairs of a run with `--pairs outputs/<run>/pairs`. Steps after the first are timed.

    python benchmarks/training.py [--model embedded] [--steps 6] [--batch 2]

The last line is `ratio: <fclib / plain TRL>` in seconds per step.
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

ARMS = ("plain", "fclib", "fclib+precompute", "fclib-4bit")


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

        quantization = "4bit" if arm == "fclib-4bit" else "none"
        settings = TrainSettings(
            student=model, quantization=quantization, precompute_ref=arm.endswith("precompute"), **common
        )
        train(pairs, out, settings, resume=False, callbacks=[Clock()])
    peak = (
        torch.cuda.max_memory_allocated()
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {"arm": arm, "s_per_step": sum(times[1:]) / max(1, len(times) - 1), "steps": len(times), "peak_bytes": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--pairs", help="a pairs/ folder of a run (default: FOL pairs made here)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument(
        "--arms", nargs="+", choices=ARMS, default=list(ARMS), help="arms to run (ratios need 'plain' and 'fclib')"
    )
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    args = ap.parse_args()
    if args.arm:
        print("RESULT " + json.dumps(run_arm(args.arm, args.pairs, args.model, args.steps, args.batch)))
        return

    pairs = args.pairs or str(make_pairs(Path(tempfile.mkdtemp(prefix="fclib-pairs-"))))
    import torch

    from fclib.pairs import load_pairs

    n = load_pairs(pairs)["train"].num_rows
    print(
        f"model {args.model}, {n} pairs, batch {args.batch}, {args.steps} steps (first one not timed), "
        f"{'cuda' if torch.cuda.is_available() else f'cpu, {torch.get_num_threads()} threads'}"
    )
    results = {}
    for arm in args.arms:
        cmd = [
            sys.executable,
            __file__,
            "--arm",
            arm,
            "--pairs",
            pairs,
            "--model",
            args.model,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"arm {arm} failed:\n{proc.stderr[-3000:]}")
        r = results[arm] = json.loads(line[7:])
        print(f"{arm:<18} {r['s_per_step']:7.2f} s/step   peak memory {r['peak_bytes'] / 2**30:5.2f} GiB", flush=True)
    if "plain" not in results:
        return
    base = results["plain"]["s_per_step"]
    if "fclib-4bit" in results:
        print(f"QLoRA (4-bit) / plain TRL: {results['fclib-4bit']['s_per_step'] / base:.2f}")
    if "fclib+precompute" in results:
        print(f"precomputed reference / plain TRL: {results['fclib+precompute']['s_per_step'] / base:.2f}")
    if "fclib" in results:
        print(f"ratio: {results['fclib']['s_per_step'] / base:.2f}")


if __name__ == "__main__":
    main()
