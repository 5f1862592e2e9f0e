"""Chains per minute of teacher generation: concurrency 1 versus 8 against one loopback endpoint.

Every arm solves the same FOL training problems through the real agent, greedy, with the
same limits. The endpoint is `transformers serve` with the embedded model on 127.0.0.1, run
twice: as it starts by default (one request generated at a time) and with
`--continuous-batching` (concurrent requests generated together). The in-process batched
backend runs the same chains for comparison.

    python benchmarks/teacher_concurrency.py [--model embedded] [--problems 8] [--steps 4]

The last line is `ratio: <concurrency 8 / concurrency 1>` on the continuous-batching server.
"""

from __future__ import annotations

import torch
from common import chain_arguments, chains_per_minute

from fclib.agent import AgentConfig
from fclib.backends.local import LocalBackend
from fclib.backends.server import LocalServer
from fclib.tasks import fol


def main() -> None:
    args = chain_arguments(__doc__.splitlines()[0])

    problems = fol.generate(args.problems, seed=7, nmax=6, split="train")
    config = AgentConfig(max_steps=args.steps)
    print(
        f"{len(problems)} FOL chains of at most {args.steps} steps, greedy, model {args.model}, "
        f"torch threads {torch.get_num_threads()}"
    )
    rates = {}
    for cb in (False, True):
        with LocalServer(args.model, continuous_batching=cb) as server:
            for concurrency in (1, 8):
                backend = server.backend(concurrency=concurrency, timeout=600)
                backend.check()
                chains_per_minute(backend, problems[:2], AgentConfig(max_steps=1))  # warm-up
                rate, counts = chains_per_minute(backend, problems, config)
                label = f"serve{' --continuous-batching' if cb else ''}, concurrency {concurrency}"
                rates[(cb, concurrency)] = rate
                print(f"{label:<48} {rate:7.2f} chains/min   {counts}", flush=True)
    local = LocalBackend.load(args.model, batch_size=8)
    chains_per_minute(local, problems[:2], AgentConfig(max_steps=1))
    rate, counts = chains_per_minute(local, problems, config)
    print(f"{'in-process LocalBackend, batch 8':<48} {rate:7.2f} chains/min   {counts}")
    print(f"sequential server: concurrency 8 / 1 = {rates[(False, 8)] / rates[(False, 1)]:.2f}")
    print(f"in-process batched / best server arm = {rate / max(rates.values()):.2f}")
    print(f"ratio: {rates[(True, 8)] / rates[(True, 1)]:.2f}")


if __name__ == "__main__":
    main()
