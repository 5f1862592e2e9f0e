"""Verified and faithful FOL chains of finished runs, counted from their `eval/results.jsonl`.

    .venv/bin/python scripts/faithful.py outputs/cpu-seeds [more sweep or run folders]

Runs made before `metrics.json` held the faithful share (`fclib.tasks.fol.faithful`) are counted
here with the same function: per run, model and held-out world size (`n6`, `n10`, ...), then summed
per folder.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from fclib.runs import read_jsonl
from fclib.tasks.fol import faithful


def runs_in(folder: Path) -> list[Path]:
    """The run folders in `folder` (or `folder` itself) that hold evaluation results."""
    if (folder / "eval" / "results.jsonl").is_file():
        return [folder]
    return sorted(p for p in folder.iterdir() if (p / "eval" / "results.jsonl").is_file())


def counts(run: Path) -> dict[tuple[str, str], list[int]]:
    """{(model, world size or 'all'): [verified, faithful, chains]} of a run's FOL chains (sample 0)."""
    rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for r in read_jsonl(run / "eval" / "results.jsonl"):
        if r["task"] != "fol" or r["sample"]:
            continue
        size = r["problem_id"].split("-")[2]  # fol-test-n10-d1-00003
        for key in ((r["source"], size), (r["source"], "all")):
            rows[key][0] += r["outcome"] == "correct"
            rows[key][1] += r["outcome"] == "correct" and faithful(r["calls"])
            rows[key][2] += 1
    return rows


def main(folders: list[str]) -> None:
    if not folders:
        raise SystemExit(__doc__)
    for folder in map(Path, folders):
        total: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        for run in runs_in(folder):
            for (model, size), row in sorted(counts(run).items()):
                print(f"{run.name} {model} {size}: verified {row[0]}/{row[2]}, faithful {row[1]}/{row[2]}")
                total[(model, size)] = [a + b for a, b in zip(total[(model, size)], row)]
        for (model, size), (v, f, n) in sorted(total.items()):
            print(f"all of {folder.name}, {model} {size}: verified {v}/{n}, faithful {f}/{n}")


if __name__ == "__main__":
    main(sys.argv[1:])
