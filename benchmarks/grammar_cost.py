"""What constrained decoding costs per token on the local backend: the same chains with and without the grammar.

Both arms run the agent greedily on the same held-out problems (FOL and GSM8K, the cpu profile's
prompts) with the embedded model in this one process. The grammar arm's replies are shorter (one
call and nothing else), so the arms are compared per generated token, and the time the grammar's
masks take (`GrammarMask`: the matchers and the masking) is reported on its own, per decoding step.

    python benchmarks/grammar_cost.py [--model embedded] [--problems 8] [--steps 4] [--repeats 2]

The last line is `ratio: <grammar / plain>` (seconds per generated token).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from fclib.agent import AgentConfig, run_chains
from fclib.backends.local import LocalBackend
from fclib.tasks import TASKS, build_problems


def arm(backend: LocalBackend, problems: list, config: AgentConfig) -> dict:
    """Seconds, generated tokens, decoding steps and mask seconds of one run of the chains."""
    backend.clear_cache()
    backend.grammar_stats = {"seconds": 0.0, "steps": 0}
    t0 = time.perf_counter()
    chains = run_chains(backend, TASKS, problems, config, progress=False)
    seconds = time.perf_counter() - t0
    calls = [c for chain in chains for c in chain.calls]
    return {
        "seconds": seconds,
        "tokens": sum(c.usage["completion_tokens"] for c in chains),
        "valid": sum(c["kind"] in ("ok", "function_error") for c in calls) / max(1, len(calls)),
        "mask_seconds": backend.grammar_stats["seconds"],
        "steps": backend.grammar_stats["steps"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--problems", type=int, default=8, help="held-out problems per task")
    ap.add_argument("--steps", type=int, default=4, help="agent steps per chain")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    _, test = build_problems(0, 1, args.problems, 1, args.problems)
    backend = LocalBackend.load(args.model, batch_size=16)
    config = AgentConfig(max_steps=args.steps)
    backend.grammar_tokenizer()  # built once per backend (about a second): not part of either arm
    arm(backend, test[:2], replace(config, max_steps=1))  # warm-up
    print(
        f"model {backend.model_id}, torch threads {torch.get_num_threads()}, {len(test)} problems, "
        f"{args.steps} steps a chain, greedy, best of {args.repeats}"
    )
    results = {}
    for label, grammar in (("plain", False), ("grammar", True)):
        runs = [arm(backend, test, replace(config, grammar=grammar)) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["seconds"] / r["tokens"])
        results[label] = best
        print(
            f"{label:>8}: {best['tokens']:5d} tokens in {best['seconds']:6.1f} s = "
            f"{1e3 * best['seconds'] / best['tokens']:6.1f} ms a token; valid calls {best['valid']:.0%}"
        )
    g = results["grammar"]
    print(
        f"grammar masks: {g['steps']} decoding steps of up to 16 rows, "
        f"{1e3 * g['mask_seconds'] / g['steps']:.2f} ms a step, {g['mask_seconds'] / g['seconds']:.1%} of its time"
    )
    plain, grammar = (results[k]["seconds"] / results[k]["tokens"] for k in ("plain", "grammar"))
    print(f"ratio: {grammar / plain:.2f}")


if __name__ == "__main__":
    main()
