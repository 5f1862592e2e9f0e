"""Notebook 06: many finished runs side by side (a sweep's seeds and variants).

The per-run numbers come from each run's `eval/metrics.json` (notebook 05). Over seeds, base
and DPO are compared on each seed's own problems, and pooled two ways:

- **Exact stratified test** (conditional McNemar over strata): within each seed only the
  problems where base and DPO disagree carry information; under "no effect" each of them is
  equally likely to favour either model, so the DPO-only count summed over seeds is
  Binomial(all discordant problems, 1/2). Two-sided exact p-value.
- **Random-effects interval** of the mean per-seed difference in verified accuracy:
  DerSimonian-Laird between-seed variance tau^2 with the Hartung-Knapp(-Sidik-Jonkman) interval
  (t distribution with seeds - 1 degrees of freedom, not narrower than the fixed-effect one),
  the recommended interval for few studies. Each seed's variance comes from the Agresti-Min
  adjusted counts, as notebook 05's per-run interval does, so a seed where both models score 0
  still has one.
- **Hierarchical bootstrap** as a check: seeds resampled, then problems within each seed
  (from its 2x2 table), the percentile interval of the mean difference.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fclib.runs import PROJECT_ROOT, read_jsonl
from fclib.tasks.fol import faithful

OUTCOMES = "eval/outcomes.json"  # each model's outcome on each held-out problem: what a sweep's record keeps
RECORDED_SWEEP = PROJECT_ROOT / "docs" / "sweeps" / "cpu-seeds"  # the cpu default over seeds 0-4, as run here
MODELS = ("base", "dpo")
COLUMNS = {  # metrics.json field: column name
    "accuracy": "verified",
    "answer_accuracy": "answer right",
    "valid_call_rate": "valid calls",
    "answered": "answered",
    "mean_calls": "calls/chain",
}


@dataclass
class RunResult:
    """One finished run: its name, variant and seed, parameters, metrics and wall times."""

    name: str
    variant: str
    seed: int
    params: dict[str, Any]
    metrics: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    sweep: dict[str, Any] = field(default_factory=dict)  # the run's entry in sweep.json (wall_s, reused), if any
    folder: Path | None = None  # the run's folder, where its per-problem outcomes are read when asked for

    @cached_property
    def outcomes(self) -> dict[str, Any]:
        """`problem_outcomes` of the run: its record's `eval/outcomes.json`, else made from its `eval/results.jsonl`
        (read only when a comparison asks for it); {} where the run kept neither."""
        if self.folder is not None and (self.folder / OUTCOMES).is_file():
            return json.loads((self.folder / OUTCOMES).read_text())
        if self.folder is not None and (self.folder / "eval" / "results.jsonl").is_file():
            return problem_outcomes(self.folder / "eval" / "results.jsonl")
        return {}

    @property
    def wall_s(self) -> float:
        """Seconds this run took: its own notebooks (a sweep's record), else the sum of its notebooks' times."""
        return float(self.sweep.get("wall_s", sum(self.timings.values())))

    @property
    def copied(self) -> list[str]:
        """The notebooks a sweep copied from another run instead of running them."""
        return [nn for r in self.sweep.get("reused", []) for nn in r["notebooks"]]


def load_runs(where: str | Path | Sequence[str | Path]) -> list[RunResult]:
    """The finished runs of a sweep folder (its `sweep.json` names them and their variants), of a folder
    of run folders, or of a list of run folders. A run without `eval/metrics.json` is left out."""
    if isinstance(where, str | Path):
        folder = Path(where)
        if not folder.is_dir():
            raise FileNotFoundError(f"no folder {folder}")
        sweep = folder / "sweep.json"
        if sweep.is_file():
            entries = json.loads(sweep.read_text())["runs"]
            named = [(folder / e["name"], e) for e in entries]
        elif (folder / "eval" / "metrics.json").is_file():
            named = [(folder, {})]
        else:
            named = [(p, {}) for p in sorted(folder.iterdir()) if (p / "eval" / "metrics.json").is_file()]
    else:
        named = [(Path(p), {}) for p in where]
    found = []
    for path, entry in named:
        if not (path / "eval" / "metrics.json").is_file():
            continue
        params = yaml.safe_load((path / "params.yaml").read_text()) if (path / "params.yaml").is_file() else {}
        timings = json.loads((path / "timings.json").read_text()) if (path / "timings.json").is_file() else {}
        found.append(
            RunResult(
                name=path.name,
                variant=entry.get("variant") or re.sub(r"-?s\d+$", "", path.name) or "default",
                seed=int(params.get("seed", 0)),
                params=params,
                metrics=json.loads((path / "eval" / "metrics.json").read_text()),
                timings=timings,
                sweep=entry,
                folder=path,
            )
        )
    if not found:
        raise FileNotFoundError(f"no finished run (eval/metrics.json) in {where}")
    return found


def problem_outcomes(results_file: Path) -> dict[str, Any]:
    """Each model's outcome on each held-out problem (its first sample) from a run's `eval/results.jsonl`, and the
    FOL problems each model solved with a faithful chain: what a sweep's record keeps (`eval/outcomes.json`), so
    that the models of two runs can be compared problem by problem (`cross_table`) from committed files."""
    outcomes: dict[str, dict[str, dict[str, str]]] = {}
    kept: dict[str, list[str]] = {}
    for r in read_jsonl(results_file):
        if r["sample"]:
            continue
        outcomes.setdefault(r["source"], {}).setdefault(r["task"], {})[r["problem_id"]] = r["outcome"]
        if r["task"] == "fol" and r["outcome"] == "correct" and faithful(r["calls"]):
            kept.setdefault(r["source"], []).append(r["problem_id"])
    ordered = {m: {t: dict(sorted(x.items())) for t, x in sorted(by.items())} for m, by in sorted(outcomes.items())}
    return {"outcomes": ordered, "faithful": {m: sorted(ids) for m, ids in sorted(kept.items())}}


def cross_table(
    first: RunResult, first_model: str, second: RunResult, second_model: str, task: str = "fol"
) -> dict[str, int]:
    """The 2x2 table of two models of two runs on the same held-out problems (say the SFT control's student
    and the recipe's, one seed): `both`, `base_only` (the first model alone solved it), `other_only` (the
    second alone), `neither`. Runs evaluated on different problems are not paired: an error."""
    name, nmax = split_task(task)
    found = []
    for run, model in ((first, first_model), (second, second_model)):
        x = run.outcomes.get("outcomes", {}).get(model, {}).get(name)
        if x is None:
            raise ValueError(f"run {run.name} keeps no outcomes of {model} on {name} ({OUTCOMES})")
        found.append({k: v for k, v in x.items() if nmax is None or f"-n{nmax}-" in k})
    a, b = found
    if set(a) != set(b):
        raise ValueError(f"runs {first.name} and {second.name} were evaluated on different {task} problems")
    table = {"both": 0, "base_only": 0, "other_only": 0, "neither": 0}
    for pid in a:
        x, y = a[pid] == "correct", b[pid] == "correct"
        table["both" if x and y else "base_only" if x else "other_only" if y else "neither"] += 1
    return table


def mcnemar_p(table: dict[str, int]) -> float:
    """Exact two-sided McNemar p-value of one 2x2 table (the discordant problems, Binomial(n, 1/2))."""
    from scipy.stats import binomtest

    b, c = table["base_only"], table["other_only"]
    return float(binomtest(c, b + c, 0.5).pvalue) if b + c else 1.0


def seed_table(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per run, task and model: the run's headline numbers."""
    rows = []
    for r in results:
        for task in sorted({t for m in MODELS for t in r.metrics["models"].get(m, {})}):
            for model in MODELS:
                x = r.metrics["models"].get(model, {}).get(task)
                if x is None:
                    continue
                rows.append(
                    {
                        "variant": r.variant,
                        "seed": r.seed,
                        "task": task,
                        "model": model,
                        "n": x["n"],
                        **{col: x[key] for key, col in COLUMNS.items()},
                        "faithful": x["faithful"]["accuracy"] if "faithful" in x else None,  # FOL; older runs have none
                    }
                )
    return rows


def _seed_difference(table: dict[str, int]) -> tuple[float, float]:
    """(difference in verified accuracy, its variance) of one seed; the variance from the Agresti-Min adjusted
    counts (as notebook 05's interval), so that a seed where the models never disagree still has one."""
    b, c = table["base_only"], table["other_only"]
    n = b + c + table["both"] + table["neither"]
    bs, cs, ns = b + 0.5, c + 0.5, n + 2
    return (c - b) / n, max((bs + cs) - (cs - bs) ** 2 / ns, 1e-12) / ns**2


def split_task(task: str) -> tuple[str, str | None]:
    """A task name as notebook 06 writes it, `fol` or `fol n10` (FOL worlds of nmax 10 alone): ('fol', '10')."""
    name, _, nmax = task.partition(" n")
    return name, nmax or None


def run_tasks(results: Sequence[RunResult]) -> list[str]:
    """The tasks the runs compare base and DPO on, each followed by its held-out world sizes when there are
    several (`fol`, `fol n10`, `fol n20`, `gsm8k`)."""
    found: dict[str, None] = {}
    for r in results:
        for task, p in sorted(r.metrics.get("paired", {}).items()):
            found[task] = None
            found.update({f"{task} n{k}": None for k in p.get("by_nmax", {})})
    return list(found)


def paired(result: RunResult, task: str, pair: Sequence[str] = MODELS) -> dict[str, Any] | None:
    """A run's paired comparison of two models on `task` (notebook 05's `paired` for base and DPO, else one
    of its `comparisons`, such as base+grammar vs dpo), or None when the run did not evaluate both. A task
    `fol n10` is the comparison within the held-out worlds of nmax 10."""
    first, second = pair
    name, nmax = split_task(task)
    found = result.metrics.get("paired", {}) if tuple(pair) == MODELS else {}
    found = (found or result.metrics.get("comparisons", {}).get(f"{first} vs {second}", {})).get(name)
    return found.get("by_nmax", {}).get(nmax) if found is not None and nmax else found


def solved(result: RunResult, model: str, task: str) -> int:
    """How many of `task`'s problems a model solved in a run, from its own metrics (not from the paired table)."""
    name, nmax = split_task(task)
    x = result.metrics["models"][model][name]
    if nmax is None:
        return int(x["correct"])
    cell = x["by_nmax"][nmax]
    return round(cell["accuracy"] * cell["n"])


def comparisons(results: Sequence[RunResult]) -> list[tuple[str, str]]:
    """The model pairs compared besides base and DPO (notebook 05's `comparisons`), in the order runs hold them."""
    found: dict[tuple[str, str], None] = {}
    for r in results:
        for name in r.metrics.get("comparisons", {}):
            first, second = name.split(" vs ")
            found[(first, second)] = None
    return list(found)


def pooled_effect(
    results: Sequence[RunResult], task: str = "fol", bootstrap: int = 10000, seed: int = 0, pair: Sequence[str] = MODELS
) -> dict[str, Any]:
    """Two models (`pair`: base and DPO unless given) over the runs, one a seed, on `task`: the exact
    stratified test, the random-effects mean difference with its Hartung-Knapp interval, and a
    hierarchical bootstrap interval. The counts are named for base (the first) and DPO (the second)."""
    tables = [x["table"] for r in results if (x := paired(r, task, pair)) is not None]
    if not tables:
        raise ValueError(f"no run compares {pair[0]} and {pair[1]} on {task}")
    return pooled_tables(tables, task, list(pair), bootstrap, seed)


def pooled_tables(
    tables: Sequence[dict[str, int]], task: str, models: list[str], bootstrap: int = 10000, seed: int = 0
) -> dict[str, Any]:
    """`pooled_effect` on the 2x2 tables themselves (one a seed: `both`, `base_only` for the first model alone,
    `other_only` for the second alone, `neither`), wherever they come from (`cross_table`: two runs' models)."""
    from scipy.stats import t

    k = len(tables)
    b = sum(x["base_only"] for x in tables)
    c = sum(x["other_only"] for x in tables)
    p_value = mcnemar_p({"base_only": b, "other_only": c})  # stratified: the discordant problems of all seeds
    raw, var = (np.array(v) for v in zip(*(_seed_difference(x) for x in tables)))
    w = 1 / var
    fixed = float(np.sum(w * raw) / np.sum(w))
    q = float(np.sum(w * (raw - fixed) ** 2))
    tau2 = max(0.0, (q - (k - 1)) / (np.sum(w) - np.sum(w**2) / np.sum(w))) if k > 1 else 0.0
    ws = 1 / (var + tau2)
    mean = float(np.sum(ws * raw) / np.sum(ws))
    if k > 1:
        hk = float(np.sum(ws * (raw - mean) ** 2) / ((k - 1) * np.sum(ws)))
        se = math.sqrt(max(hk, 1 / float(np.sum(ws))))
        half = float(t.ppf(0.975, k - 1)) * se
    else:
        se = math.sqrt(1 / float(np.sum(ws)))
        half = 1.96 * se
    rng = np.random.default_rng(seed)
    cells = [np.array([x["both"], x["base_only"], x["other_only"], x["neither"]], dtype=float) for x in tables]
    boots = np.empty(bootstrap)
    for i in range(bootstrap):
        picked = rng.integers(0, k, size=k)
        diffs = []
        for j in picked:
            n = int(cells[j].sum())
            draw = rng.multinomial(n, cells[j] / n)
            diffs.append((draw[2] - draw[1]) / n)
        boots[i] = np.mean(diffs)
    return {
        "task": task,
        "models": models,
        "seeds": k,
        "n": int(sum(sum(x.values()) for x in tables)),
        "base_correct": int(sum(x["both"] + x["base_only"] for x in tables)),
        "dpo_correct": int(sum(x["both"] + x["other_only"] for x in tables)),
        "base_only": b,
        "dpo_only": c,
        "p_value": p_value,
        "test": "exact stratified McNemar (DPO-only among discordant problems, all seeds), two-sided",
        "mean_difference": float(np.mean(raw)),
        "random_effects": {
            "difference": mean,
            "ci95": [max(-1.0, mean - half), min(1.0, mean + half)],  # a difference of shares: within [-1, 1]
            "tau2": tau2,
            "method": "DerSimonian-Laird tau^2, Hartung-Knapp interval (t, seeds - 1 df)",
        },
        "bootstrap_ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
        "per_seed": [float(d) for d in raw],
    }


def pooled_valid_calls(results: Sequence[RunResult], task: str = "fol", pair: Sequence[str] = MODELS) -> dict[str, Any]:
    """Valid-call rates over seeds: the exact sign test on the problems where DPO's (the second model's)
    share is higher or lower than base's, pooled over seeds; and the mean of each model's per-seed rate."""
    from scipy.stats import binomtest

    rows = [x["valid_calls"] for r in results if (x := paired(r, task, pair)) is not None]
    higher, lower = sum(x["higher"] for x in rows), sum(x["lower"] for x in rows)
    return {
        "task": task,
        "seeds": len(rows),
        "base_rate": float(np.mean([x["base_rate"] for x in rows])) if rows else float("nan"),
        "dpo_rate": float(np.mean([x["other_rate"] for x in rows])) if rows else float("nan"),
        "higher": higher,
        "lower": lower,
        "p_value": float(binomtest(higher, higher + lower, 0.5).pvalue) if higher + lower else 1.0,
    }


def comparison_table(results: Sequence[RunResult], task: str = "fol", bootstrap: int = 2000) -> list[dict[str, Any]]:
    """One row per compared pair of models (base and DPO first, then notebook 05's `comparisons`, such as
    the grammar-constrained students), pooled over the runs that evaluated both."""
    rows = []
    for pair in [MODELS, *comparisons(results)]:
        group = [r for r in results if paired(r, task, pair) is not None]
        if not group:
            continue
        p = pooled_effect(group, task, bootstrap=bootstrap, pair=pair)
        calls = pooled_valid_calls(group, task, pair)
        lo, hi = p["random_effects"]["ci95"]
        rows.append(
            {
                "first": pair[0],
                "second": pair[1],
                "seeds": " ".join(str(r.seed) for r in group),
                "first correct": f"{p['base_correct']}/{p['n']}",
                "second correct": f"{p['dpo_correct']}/{p['n']}",
                "difference": p["random_effects"]["difference"],
                "95% CI": f"{lo:+.3f} to {hi:+.3f}",
                "p (stratified)": p["p_value"],
                "valid calls first": calls["base_rate"],
                "valid calls second": calls["dpo_rate"],
            }
        )
    return rows


def by_variant(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """The runs grouped by variant, in the order variants first appear."""
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.variant, []).append(r)
    return groups


def ablation_table(results: Sequence[RunResult], task: str = "fol") -> list[dict[str, Any]]:
    """One row per variant: its seeds, mean accuracies, pooled difference with interval and p-value."""
    rows = []
    for variant, group in by_variant(results).items():
        pooled = pooled_effect(group, task, bootstrap=2000)
        calls = pooled_valid_calls(group, task)
        lo, hi = pooled["random_effects"]["ci95"]
        rows.append(
            {
                "variant": variant,
                "seeds": " ".join(str(r.seed) for r in group),
                "base": pooled["base_correct"] / pooled["n"],
                "DPO": pooled["dpo_correct"] / pooled["n"],
                "difference": pooled["random_effects"]["difference"],
                "95% CI": f"{lo:+.3f} to {hi:+.3f}",
                "p (stratified)": pooled["p_value"],
                "valid calls base": calls["base_rate"],
                "valid calls DPO": calls["dpo_rate"],
                "changed": ", ".join(
                    f"{k}={v}" for k, v in _changed(group[0].params, results[0].params).items() if k != "seed"
                )
                or "-",
            }
        )
    return rows


def _changed(params: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != "run_name" and reference.get(k) != v}
