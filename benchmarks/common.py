"""What the chain benchmarks share: their command line and the chains-per-minute clock."""

from __future__ import annotations

import argparse
import time

from fclib.agent import outcome_counts, run_chains
from fclib.tasks import TASKS


def chain_arguments(
    description: str,
    problems: int = 8,
    flags: tuple[tuple[str, str], ...] = (),
    lists: tuple[tuple[str, str], ...] = (),
    paths: tuple[tuple[str, str], ...] = (),
) -> argparse.Namespace:
    """--model, --problems, --steps, on/off `flags`, integer `lists` and `paths`, each given as (option, help)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--problems", type=int, default=problems)
    ap.add_argument("--steps", type=int, default=4, help="agent steps per chain")
    for option, text in flags:
        ap.add_argument(option, action="store_true", help=text)
    for option, text in lists:
        ap.add_argument(option, type=int, nargs="+", default=[], help=text)
    for option, text in paths:
        ap.add_argument(option, default="", help=text)
    return ap.parse_args()


def chains_per_minute(backend, problems, config) -> tuple[float, dict]:
    """Chains per minute of one run over `problems`, and how the chains ended."""
    t0 = time.perf_counter()
    chains = run_chains(backend, TASKS, problems, config, progress=False)
    return len(chains) / (time.perf_counter() - t0) * 60, outcome_counts(chains)
