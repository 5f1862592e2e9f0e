"""The README's measured numbers, made from the committed records in docs/runs/ and docs/benchmarks/.

    python scripts/measured.py            # print the block
    python scripts/measured.py --write    # put it into README.md, between its two markers

A run record is a folder docs/runs/NAME/ holding `run.json` (commit, command, profile, wall
seconds with and without the set-up) and what the pipeline wrote (`timings.json`, `memory.json`);
a test-suite record is a folder with `run.json` alone (commit, command, seconds, passed, failed);
a training benchmark record is docs/benchmarks/training-*.json as `benchmarks/training.py --json`
writes it, plus the commit and command it ran. tests/test_docs.py checks that the README holds
exactly the block this script makes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- measured:start (scripts/measured.py) -->", "<!-- measured:end -->"


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60):02d} s"


def run_rows(runs: Path) -> list[str]:
    rows = []
    for folder in sorted(p for p in runs.iterdir() if (p / "run.json").is_file()):
        run = json.loads((folder / "run.json").read_text())
        link = f"[{folder.name}](docs/runs/{folder.name}/)"
        if run.get("kind") == "tests":
            rows.append(
                f"| {link} | `{run['command']}` at {run['commit']} | {_minutes(run['seconds'])} | "
                f"{run['passed']} passed, {run['failed']} failed | |"
            )
            continue
        timings = json.loads((folder / "timings.json").read_text())
        memory = json.loads((folder / "memory.json").read_text())
        per = ", ".join(f"{round(t)}" for t in timings.values())
        top = max(memory, key=memory.get)
        rows.append(
            f"| {link} | `{run['command']}` at {run['commit']} | {_minutes(run['pipeline_seconds'])} "
            f"({per} s) | peak {memory[top]:.2f} GiB in {top[:2]} | "
            + ", ".join(f"{v:.2f}" for v in memory.values())
            + " |"
        )
    return rows


def benchmark_lines(benchmarks: Path) -> list[str]:
    lines = []
    for path in sorted(benchmarks.glob("training-*.json")):
        record = json.loads(path.read_text())
        arms = record["arms"]
        base = arms.get("baseline")
        parts = []
        for name, arm in arms.items():
            text = f"{name} {arm['s_per_step']:.1f} s/step, {arm['peak_bytes'] / 2**30:.2f} GiB"
            if base and name.startswith("fclib"):
                text += f" ({base['s_per_step'] / arm['s_per_step']:.2f}x the baseline)"
            parts.append(text)
        lines.append(
            f"- [{path.name}](docs/benchmarks/{path.name}), `{record['command']}` at {record['commit']} "
            f"({record['device']}, {record['pairs']} pairs, batch {record['batch']}, {record['steps']} steps): "
            + "; ".join(parts)
            + "."
        )
    return lines


def block(root: Path = ROOT) -> str:
    head = "| record | command | wall time (per notebook) | peak memory (process tree) | per notebook, GiB |"
    rows = run_rows(root / "docs" / "runs")
    bench = benchmark_lines(root / "docs" / "benchmarks") if (root / "docs" / "benchmarks").is_dir() else []
    return "\n".join([START, head, "|---|---|---|---|---|", *rows, "", *bench, END])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="replace the block in README.md")
    args = ap.parse_args(argv)
    text = block()
    if not args.write:
        print(text)
        return
    readme = ROOT / "README.md"
    current = readme.read_text()
    if START not in current or END not in current:
        sys.exit(f"README.md has no block between {START!r} and {END!r}")
    head, rest = current.split(START, 1)
    readme.write_text(head + text + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()
