"""What the chain benchmarks share: their command line and the chains-per-minute clock."""

from __future__ import annotations

import argparse
import time

from fclib.agent import outcome_counts, run_chains
from fclib.tasks import TASKS


def chain_arguments(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="agent steps per chain")
    return ap.parse_args()


def chains_per_minute(backend, problems, config) -> tuple[float, dict]:
    """Chains per minute of one run over `problems`, and how the chains ended."""
    t0 = time.perf_counter()
    chains = run_chains(backend, TASKS, problems, config, progress=False)
    return len(chains) / (time.perf_counter() - t0) * 60, outcome_counts(chains)
