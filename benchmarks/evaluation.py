"""Evaluation chains per minute on the embedded model: batched versus one at a time, in one run.

Every arm runs the same held-out FOL problems through the real agent, greedy, with the same
limits, on the in-process backend:

- one at a time: `batch_size=1`, with the same prompt cache (the shared system prompt is
  computed once, and each conversation reuses its own earlier turns);
- batched: all conversations of a step in one batch (16, the backend's default batch size);
- with `--uncached`, also batched without the prompt cache, to show what the cache is worth
  (slow: every turn recomputes ~900 prompt tokens per chain).

    python benchmarks/evaluation.py [--model embedded] [--problems 16] [--steps 4] [--uncached]
    python benchmarks/evaluation.py --problems 50 --steps 3 --batch-sizes 32 16 8
    python benchmarks/evaluation.py --test-set outputs/cpu/problems/test.jsonl --steps 3 --batch-sizes 32 16

The last line is `ratio: <batched / one at a time>`. With `--batch-sizes` the arms are those
batch sizes instead (each problem set split into batches of that size), and the last line is
`ratio: <each arm / the first>`. `--test-set` runs a run's held-out problems (FOL and GSM8K)
instead of generated FOL ones.
"""

from __future__ import annotations

import torch
from common import chain_arguments, chains_per_minute

from fclib.agent import AgentConfig, run_chains
from fclib.backends.local import LocalBackend
from fclib.problems import read_problems
from fclib.tasks import TASKS, fol


def main() -> None:
    args = chain_arguments(
        __doc__.splitlines()[0],
        problems=16,
        flags=(("--uncached", "also run batched without the prompt cache"),),
        lists=(("--batch-sizes", "compare these batch sizes instead"),),
        paths=(("--test-set", "a run's problems/test.jsonl instead of generated FOL problems"),),
    )

    backend = LocalBackend.load(args.model)
    problems = (
        read_problems(args.test_set) if args.test_set else fol.generate(args.problems, seed=9, nmax=6, split="test")
    )
    config = AgentConfig(max_steps=args.steps)
    run_chains(backend, TASKS, problems[:1], AgentConfig(max_steps=1), progress=False)  # warm-up
    print(
        f"{len(problems)} chains of at most {args.steps} steps, greedy, model {args.model}, "
        f"torch threads {torch.get_num_threads()}"
    )
    arms = {}
    runs = [("one at a time", 1, True), (f"batched ({len(problems)})", len(problems), True)]
    if args.batch_sizes:
        for size in args.batch_sizes:
            backend.batch_size, backend.prefix_cache = size, True
            backend.clear_cache()
            arms[size], counts = chains_per_minute(backend, problems, config)
            print(f"batches of {size:<25} {arms[size]:7.2f} chains/min   {counts}", flush=True)
        first = args.batch_sizes[0]
        print(
            "ratio: " + ", ".join(f"{size}/{first} = {arms[size] / arms[first]:.2f}" for size in args.batch_sizes[1:])
        )
        return
    if args.uncached:
        runs.append((f"batched ({len(problems)}), no prompt cache", len(problems), False))
    for label, batch, cache in runs:
        backend.batch_size, backend.prefix_cache = batch, cache
        backend.clear_cache()
        arms[label], counts = chains_per_minute(backend, problems, config)
        print(f"{label:<36} {arms[label]:7.2f} chains/min   {counts}", flush=True)
    single, batched, *uncached = arms.values()
    if uncached:
        print(f"prompt cache: batched with / without = {batched / uncached[0]:.2f}")
    print(f"ratio: {batched / single:.2f}")


if __name__ == "__main__":
    main()
