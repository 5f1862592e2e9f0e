"""Evaluation chains per minute on the embedded model: batched versus one at a time, in one run.

Every arm runs the same held-out FOL problems through the real agent, greedy, with the same
limits, on the in-process backend:

- one at a time: `batch_size=1` (each conversation still reuses its own prompt cache);
- batched: all conversations of a step in one batch, with the prompt cache;
- batched without the prompt cache, to show what the cache itself is worth.

    python benchmarks/evaluation.py [--model embedded] [--problems 8] [--steps 4]

The last line is `ratio: <batched / one at a time>`.
"""

from __future__ import annotations

import torch
from common import chain_arguments, chains_per_minute

from fclib.agent import AgentConfig, run_chains
from fclib.llm import LocalBackend
from fclib.tasks import TASKS, fol


def main() -> None:
    args = chain_arguments(__doc__.splitlines()[0])

    backend = LocalBackend.load(args.model)
    problems = fol.generate(args.problems, seed=9, nmax=6, split="test")
    config = AgentConfig(max_steps=args.steps)
    run_chains(backend, TASKS, problems[:1], AgentConfig(max_steps=1), progress=False)  # warm-up
    print(f"{len(problems)} FOL chains of at most {args.steps} steps, greedy, model {args.model}, "
          f"torch threads {torch.get_num_threads()}")
    arms = {}
    for label, batch, cache in (("one at a time", 1, True), (f"batched ({len(problems)})", len(problems), True),
                                (f"batched ({len(problems)}), no prompt cache", len(problems), False)):  # fmt: skip
        backend.batch_size, backend.prefix_cache = batch, cache
        backend.clear_cache()
        arms[label], counts = chains_per_minute(backend, problems, config)
        print(f"{label:<36} {arms[label]:7.2f} chains/min   {counts}", flush=True)
    single, batched, uncached = arms.values()
    print(f"prompt cache: batched with / without = {batched / uncached:.2f}")
    print(f"ratio: {batched / single:.2f}")


if __name__ == "__main__":
    main()
