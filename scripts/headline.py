"""The README's headline table, made from the committed sweep records in docs/sweeps/.

    python scripts/headline.py            # print the blocks
    python scripts/headline.py --write    # put them into README.md and docs/results.md, between their markers

The table is the decisive control of the recipe's loss: on the same pairs, seeds, steps and
evaluation, the untrained student, SFT on the chosen sides alone, plain DPO and fclib's DPO + SFT
term (docs/sweeps/cpu-controls, `profiles/variants/controls.yaml`). Each trained student is
compared with the base student of its own seed (exact stratified McNemar test over seeds, and the
random-effects mean difference with its 95% interval; the number of seeds significant on their
own, exact McNemar p < 0.05) and, problem by problem, with the SFT control's student of the same
seed (from each run's `eval/outcomes.json`). Only seeds where every row's run has finished are
counted, and the block says which. docs/results.md gets the same rows seed by seed.
tests/test_docs.py checks that both files hold exactly the blocks this script makes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fclib import compare

ROOT = Path(__file__).resolve().parent.parent

START, END = "<!-- headline:start (scripts/headline.py) -->", "<!-- headline:end -->"
SEEDS_START, SEEDS_END = "<!-- controls-by-seed:start (scripts/headline.py) -->", "<!-- controls-by-seed:end -->"
CONTROLS = "docs/sweeps/cpu-controls"
VARIANTS = "profiles/variants/controls.yaml"
CONTROL = "sft-only"  # the row each DPO row is also compared with, problem by problem
ROWS = {  # variant of the controls sweep: the row's name
    "sft-only": "SFT on the chosen sides only",
    "dpo-only": "plain DPO",
    "default": "DPO + SFT term (fclib's recipe)",
}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _p(p: float) -> str:
    return f"{p:.2g}"


def _seeds(seeds: list[int]) -> str:
    if seeds and seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def finished(folder: Path) -> tuple[dict, dict[str, dict[int, compare.RunResult]], list[int]]:
    """The sweep's record, its finished runs by variant and seed, and the seeds every variant has finished."""
    record = json.loads((folder / "sweep.json").read_text())
    by = {v: {r.seed: r for r in group} for v, group in compare.by_variant(compare.load_runs(folder)).items()}
    seeds = [s for s in sorted(record["seeds"]) if all(s in by.get(v, {}) for v in ROWS)]
    if not seeds:
        raise SystemExit(f"{folder}: no seed has finished every variant of {', '.join(ROWS)}")
    return record, by, seeds


def controls(by: dict[str, dict[int, compare.RunResult]], seeds: list[int], task: str = "fol") -> list[str]:
    """The control table's rows for `task` over `seeds` (`finished`'s runs)."""
    head = "| student | solved | per seed | minus base (95% CI over seeds) | p, vs base | seeds p < 0.05 | valid calls "
    head += f"| against {ROWS[CONTROL]} (p) |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    base = [by["default"][s] for s in seeds]
    n = sum(r.metrics["models"]["base"][task]["n"] for r in base)
    lines.append(
        f"| base (untrained) | {sum(compare.solved(r, 'base', task) for r in base)}/{n} | "
        + " ".join(str(compare.solved(r, "base", task)) for r in base)
        + f" | | | | {_pct(sum(r.metrics['models']['base'][task]['valid_call_rate'] for r in base) / len(base))} | |"
    )
    for variant, name in ROWS.items():
        group = [by[variant][s] for s in seeds]
        p = compare.pooled_effect(group, task)
        lo, hi = p["random_effects"]["ci95"]
        alone = sum(compare.mcnemar_p(compare.paired(r, task)["table"]) < 0.05 for r in group)
        calls = compare.pooled_valid_calls(group, task)
        fell = sum(
            r.metrics["models"]["dpo"][task]["valid_call_rate"] < r.metrics["models"]["base"][task]["valid_call_rate"]
            for r in group
        )
        against = ""
        if variant != CONTROL:
            tables = [compare.cross_table(by[CONTROL][s], "dpo", by[variant][s], "dpo", task) for s in seeds]
            x = compare.pooled_tables(tables, task, [CONTROL, variant])
            against = f"{x['dpo_only'] - x['base_only']:+d} problems ({_p(x['p_value'])})"
        lines.append(
            f"| {name} | **{p['dpo_correct']}/{p['n']}** | "
            + " ".join(str(compare.solved(r, "dpo", task)) for r in group)
            + f" | {p['random_effects']['difference']:+.3f} ({lo:+.3f} to {hi:+.3f}) | {_p(p['p_value'])} | "
            f"{alone} of {len(group)} | {_pct(calls['dpo_rate'])}"
            + (f", below base on {fell} seed{'s' * (fell != 1)}" if fell else "")
            + f" | {against} |"
        )
    return lines


def seeds_block(root: Path = ROOT, task: str = "fol") -> str:
    """docs/results.md's table of the controls: each seed's count and valid-call rate per row, and p against base."""
    _, by, seeds = finished(root / CONTROLS)
    head = "| seed | base | " + " | ".join(ROWS.values()) + " |"
    lines = [head, "|---" * (len(ROWS) + 2) + "|"]
    for seed in seeds:
        base = by["default"][seed].metrics["models"]["base"][task]
        cells = [f"{base['correct']}/{base['n']}, {_pct(base['valid_call_rate'])} valid"]
        for variant in ROWS:
            run = by[variant][seed]
            x = run.metrics["models"]["dpo"][task]
            p = compare.mcnemar_p(compare.paired(run, task)["table"])
            cells.append(f"**{x['correct']}**/{x['n']} (p {_p(p)}), {_pct(x['valid_call_rate'])} valid")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join([SEEDS_START, *lines, SEEDS_END])


def block(root: Path = ROOT) -> str:
    record, by, seeds = finished(root / CONTROLS)
    lines = controls(by, seeds)
    per_seed = sorted({by["default"][s].metrics["models"]["base"]["fol"]["n"] for s in seeds})
    planned = sorted(record["seeds"])
    partial = "" if seeds == planned else f" (seeds {_seeds(planned)} planned; the others not finished yet)"
    command = (
        f"python -m fclib.sweep --profile {record['profile']} --seeds {_seeds(planned)} --variants {VARIANTS} "
        f"--name {record['name']} --record {CONTROLS}"
    )
    commits = list(dict.fromkeys(s["commit"]["commit"][:7] for s in record.get("sessions", []) if s.get("commit")))
    intro = (
        f"Held-out FOL problems (worlds as in training, verified chains), seed{'s' * (len(seeds) > 1)} "
        f"{_seeds(seeds)}{partial}, "
        f"{' or '.join(map(str, per_seed))} a seed; "
        "every row trains on the same pairs for the same steps and is evaluated on the same problems: only the "
        f"loss differs. Sweep [{CONTROLS}]({CONTROLS}/) at commit{'s' * (len(commits) > 1)} "
        f"{', '.join(commits) or record['commit'][:7]}: "
        f"`{command}`."
    )
    return "\n".join([START, intro, "", *lines, END])


def _replace(path: Path, text: str, start: str, end: str) -> None:
    current = path.read_text()
    if start not in current or end not in current:
        sys.exit(f"{path.relative_to(ROOT)} has no block between {start!r} and {end!r}")
    head, rest = current.split(start, 1)
    path.write_text(head + text + rest.split(end, 1)[1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="replace the blocks in README.md and docs/results.md")
    args = ap.parse_args(argv)
    text, seeds = block(), seeds_block()
    if not args.write:
        print(text + "\n\n" + seeds)
        return
    _replace(ROOT / "README.md", text, START, END)
    _replace(ROOT / "docs" / "results.md", seeds, SEEDS_START, SEEDS_END)


if __name__ == "__main__":
    main()
