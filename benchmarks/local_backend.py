"""Tokens per second of the local backend: one conversation at a time versus a batch of 8.

Both arms run on the embedded model in this one process, with the same prompts, greedy
decoding and the same number of new tokens, so the ratio compares like with like.

    python benchmarks/local_backend.py [--model embedded] [--batch 8] [--tokens 64] [--repeats 2]

The last line is `ratio: <batched / single>` (aggregate tokens per second).
"""

from __future__ import annotations

import argparse
import time

import torch

from fclib.backends import GenerationSettings
from fclib.backends.local import LocalBackend

QUESTIONS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "A box holds 6 eggs. How many eggs are in 7 boxes?",
    "Sara had 20 dollars and spent 7. How much money is left?",
    "A train travels 60 miles per hour for 3 hours. How far does it go?",
    "There are 24 students split evenly into 4 groups. How many are in each group?",
    "Ben reads 12 pages a day for 5 days. How many pages does he read?",
    "A shirt costs 15 dollars and is discounted by 4 dollars. What is the new price?",
    "Mia has 7 red and 9 blue marbles. How many marbles does she have?",
]


def run(backend: LocalBackend, conversations: list, batch_size: int, settings: GenerationSettings) -> tuple[float, int]:
    """Seconds and generated tokens for all conversations, `batch_size` at a time."""
    backend.batch_size = batch_size
    t0 = time.perf_counter()
    replies = backend.chat(conversations, settings)
    return time.perf_counter() - t0, sum(r.completion_tokens for r in replies)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    backend = LocalBackend.load(args.model)
    conversations = [
        [{"role": "system", "content": "Solve the problem. Explain each step."}, {"role": "user", "content": q}]
        for q in (QUESTIONS * ((args.batch + len(QUESTIONS) - 1) // len(QUESTIONS)))[: args.batch]
    ]
    # Ignore EOS so that both arms generate exactly the same number of tokens.
    settings = GenerationSettings(max_tokens=args.tokens, extra={"min_new_tokens": args.tokens})
    run(backend, conversations[:2], 2, GenerationSettings(max_tokens=4))  # warm-up

    print(
        f"model {backend.model_id}, torch threads {torch.get_num_threads()}, {args.batch} conversations, "
        f"{args.tokens} new tokens each, best of {args.repeats}"
    )
    results = {}
    for label, bs in (("single", 1), (f"batch {args.batch}", args.batch)):
        best = min((run(backend, conversations, bs, settings) for _ in range(args.repeats)), key=lambda r: r[0])
        results[label] = best[1] / best[0]
        print(f"{label:>10}: {best[1]:5d} tokens in {best[0]:6.2f} s = {results[label]:7.1f} tokens/s")
    single, batched = results["single"], results[f"batch {args.batch}"]
    print(f"ratio: {batched / single:.2f}")


if __name__ == "__main__":
    main()
