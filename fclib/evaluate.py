"""Stage 5, evaluation: honest statistics over the chains of each model on held-out problems, and a report.

    generate(student, test, run_folder / "eval" / "results.jsonl", k=1, config=config, source="base", overwrite=True)
    m = metrics(records, test)    # the eval/metrics.json shape of DESIGN.md

The chains are made by `fclib.chains.generate`, the same agent and store as the teacher's
(`overwrite=True`: results of a label made with another model, a retrained adapter, are
moved to a backup and the model is evaluated again). Results are chain records (the
chains.jsonl contract) with `source` = the model label
(`base`, `dpo`, `teacher`; `base+grammar` and `dpo+grammar` decode under the toolset's grammar,
`fclib.backends.local.GrammarMask`), written as each chain ends and resumable exactly like teacher
generation. Accuracy counts *verified* correct chains (FOL chains must derive their answer
from the facts); `answer_accuracy` counts right final answers however they were reached.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fclib import runs
from fclib.agent import OUTCOMES, outcome_counts
from fclib.backends.endpoint import OpenAIBackend, url_fault
from fclib.chains import set_aside_counts
from fclib.problems import Problem
from fclib.settings import Settings
from fclib.tasks import fol
from fclib.train import PRECISIONS

Record = Mapping[str, Any]
EVAL_MODELS = ("base", "dpo", "teacher", "base+grammar", "dpo+grammar")  # +grammar: constrained decoding
# Pairs compared besides base vs DPO, when both are evaluated: how much a decoder constraint alone gives
COMPARISONS = (("base", "base+grammar"), ("base+grammar", "dpo"), ("dpo", "dpo+grammar"))


@dataclass
class EvalSettings(Settings):
    """Notebook 05: which models run on how many test problems, how many times; the `cpu` profile's defaults.

    The agent's limits are `AgentConfig`'s (sampling at `eval_temperature`), the teacher's `TeacherSettings`.
    """

    eval_models: list[str] = field(default_factory=lambda: list(EVAL_MODELS[:3]))  # the teacher: skipped when local
    eval_limit: int = 0  # at most this many test problems per task and FOL world size (0: all)
    eval_samples: int = 1  # chains per problem: 1 = greedy; more for pass@k and majority vote
    eval_temperature: float = 0.0  # sampling temperature of evaluation
    eval_max_tokens_per_turn: int = 0  # tokens per reply in evaluation (0: max_tokens_per_turn)
    eval_max_chain_tokens: int = 0  # context a chain may reach in evaluation (0: max_chain_tokens)
    skip_damaged_lines: bool = False  # a damaged line inside eval/results.jsonl: stop (False) or set aside
    eval_precision: str = "auto"  # auto (CPU: fp32; CUDA: 4bit for a QLoRA adapter, else bf16), fp32, bf16, 4bit
    student_url: str = ""  # an OpenAI-compatible endpoint serving the base student (its id: `student`); "": in process
    dpo_url: str = ""  # an endpoint serving the DPO student as `dpo_model` (vLLM --enable-lora); "": in process
    dpo_model: str = "dpo"  # the DPO student's model id at dpo_url (vLLM: the name in --lora-modules NAME=ADAPTER)

    def faults(self) -> list[str]:
        wrong = []
        if self.eval_precision not in PRECISIONS:
            wrong.append(f"eval_precision must be one of {', '.join(PRECISIONS)}, not {self.eval_precision!r}")
        if not self.eval_models or not set(self.eval_models) <= set(EVAL_MODELS):
            wrong.append(f"eval_models: some of {', '.join(EVAL_MODELS)}, got {self.eval_models!r}")
        if self.eval_samples < 1 or self.eval_limit < 0 or self.eval_temperature < 0:
            wrong.append("eval_samples >= 1, eval_limit >= 0 and eval_temperature >= 0")
        if self.eval_max_tokens_per_turn < 0 or self.eval_max_chain_tokens < 0:
            wrong.append("eval_max_tokens_per_turn and eval_max_chain_tokens must be >= 0 (0: the agent's own)")
        wrong += [fault for key in ("student_url", "dpo_url") if (fault := url_fault(getattr(self, key), key))]
        for key, label in (("student_url", "base+grammar"), ("dpo_url", "dpo+grammar")):
            if getattr(self, key) and label in self.eval_models:
                wrong.append(f"{label} decodes under a grammar in this process; it cannot with {key} set")
        if self.dpo_url and not self.dpo_model:
            wrong.append("dpo_url needs dpo_model, the DPO student's model id at that endpoint")
        return wrong

    def agent_limits(self) -> dict[str, int]:
        """The agent's limits evaluation sets itself (those > 0), for `AgentConfig`: held-out worlds larger than
        the training ones need longer replies (a FOL call on lists of n truth values takes about 4n + 10 tokens)."""
        given = {"max_tokens_per_turn": self.eval_max_tokens_per_turn, "max_chain_tokens": self.eval_max_chain_tokens}
        return {k: v for k, v in given.items() if v}

    def served(self, url: str, model: str, teacher: Any) -> OpenAIBackend:
        """A served student behind `url`, asked like the teacher's endpoint (`teacher`: its settings), checked now."""
        backend = OpenAIBackend(
            url,
            model,
            concurrency=teacher.concurrency,
            timeout=teacher.request_timeout,
            api_key_env=teacher.teacher_api_key_env,
        )
        backend.check()
        return backend

    def problems(self, test: Sequence[Problem]) -> list[Problem]:
        """The test problems evaluated: all, or the first `eval_limit` of each task (and of each FOL nmax)."""
        if not self.eval_limit:
            return list(test)
        groups: dict[tuple[str, Any], list[Problem]] = {}
        for p in test:
            groups.setdefault((p.task, p.meta.get("nmax")), []).append(p)
        return [p for group in groups.values() for p in group[: self.eval_limit]]


def wilson(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return (0.0, 1.0)
    lo, hi = proportion_confint(successes, n, alpha=0.05, method="wilson")
    p = successes / n  # rounding can put a bound a hair past the estimate (wilson(0, 7) gave 2.8e-17)
    return (min(float(lo), p), max(float(hi), p))


CALL_ERROR_OF_CODE = {  # tools.ERROR_CODES -> the taxonomy's words
    "parse_failure": "parse failure",
    "unknown_function": "unknown function",
    "wrong_arguments": "wrong arguments",
    "bad_value": "bad argument value",
    "function_error": "function error",
}


def call_error(call: Record) -> str | None:
    """The taxonomy class of a failed call (from its `code`), None for a successful one."""
    if call["kind"] == "ok":
        return None
    return CALL_ERROR_OF_CODE[call.get("code") or _code_of_old_record(call)]


def _code_of_old_record(call: Record) -> str:
    """The code of a call recorded before calls carried one, from its kind and message."""
    kind, error = call["kind"], call.get("error") or ""
    if kind in ("parse_error", "function_error"):
        return "parse_failure" if kind == "parse_error" else "function_error"
    if error.startswith("unknown function"):
        return "unknown_function"
    if any(s in error for s in (" takes ", " has no parameter ", " is missing ", " twice")):
        return "wrong_arguments"
    return "bad_value"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize_model(records: Sequence[Record], problems: Mapping[str, Problem] | None = None) -> dict[str, Any]:
    """Metrics of one model on one task's records (all samples)."""
    n = len(records)
    correct = sum(r["outcome"] == "correct" for r in records)
    calls = [c for r in records for c in r["calls"]]
    errors = Counter(e for e in map(call_error, calls) if e)
    out: dict[str, Any] = {
        "accuracy": correct / n if n else 0.0,
        "n": n,
        "correct": correct,
        "ci95": list(wilson(correct, n)),
        "answer_accuracy": sum(bool(r.get("answer_correct")) for r in records) / n if n else 0.0,
        "valid_call_rate": sum(map(_valid, calls)) / len(calls) if calls else 0.0,
        "mean_calls": len(calls) / n if n else 0.0,
        "answered": sum(r["outcome"] in ("correct", "wrong_answer") for r in records) / n if n else 0.0,
        "outcomes": outcome_counts(records),
        "call_errors": {e: errors.get(e, 0) for e in CALL_ERROR_OF_CODE.values()},
    }
    samples = Counter(r["problem_id"] for r in records)
    k = max(samples.values(), default=1)
    if k > 1:
        by_problem: dict[str, list[Record]] = {}
        for r in records:
            by_problem.setdefault(r["problem_id"], []).append(r)
        out["samples_per_problem"] = k
        out[f"pass@{k}"] = sum(
            pass_at_k(len(rs), sum(r["outcome"] == "correct" for r in rs), k) for rs in by_problem.values()
        ) / len(by_problem)
        votes = []
        for rs in by_problem.values():
            answers = Counter(repr(r["final_answer"]) for r in rs if r["final_answer"] is not None)
            if not answers:
                votes.append(False)
                continue
            top = answers.most_common(1)[0][0]
            votes.append(any(r.get("answer_correct") for r in rs if repr(r["final_answer"]) == top))
        out["majority_vote_answer_accuracy"] = sum(votes) / len(votes)
    if records and records[0]["task"] == "fol":  # verified, and every value passed on as it was returned
        out["faithful"] = _share([r["outcome"] == "correct" and fol.faithful(r["calls"]) for r in records])
    if problems is not None and records and records[0]["task"] == "fol":
        sizes: dict[int, list[bool]] = {}
        for r in records:
            p = problems.get(r["problem_id"])
            if p is not None:
                sizes.setdefault(int(p.meta["n"]), []).append(r["outcome"] == "correct")
        out["by_size"] = {str(s): _share(v) for s, v in sorted(sizes.items())}
        nmaxes = by_nmax(records, problems)
        if len(nmaxes) > 1:  # problems of several world sizes, as the paper reports them: each, and all
            out["by_nmax"] = {k: _share([r["outcome"] == "correct" for r in v]) for k, v in nmaxes.items()}
    return out


def by_nmax(records: Sequence[Record], problems: Mapping[str, Problem]) -> dict[str, list[Record]]:
    """FOL records grouped by their problem's world size bound (`nmax`), smallest first; {} for other tasks."""
    groups: dict[int, list[Record]] = {}
    for r in records:
        p = problems.get(r["problem_id"])
        if p is not None and "nmax" in p.meta:
            groups.setdefault(int(p.meta["nmax"]), []).append(r)
    return {str(k): v for k, v in sorted(groups.items())}


def _share(outcomes: Sequence[bool]) -> dict[str, Any]:
    """Accuracy, n and 95% Wilson interval of a list of verified outcomes."""
    return {
        "accuracy": sum(outcomes) / len(outcomes),
        "n": len(outcomes),
        "ci95": list(wilson(sum(outcomes), len(outcomes))),
    }


def paired_test(base: Sequence[Record], other: Sequence[Record]) -> dict[str, Any]:
    """Two models on the same problems (sample 0): difference, its 95% CI, exact McNemar test.

    b = problems base solves and the other does not, c = the reverse. The difference is
    (c - b) / n; its interval is the Agresti-Min adjusted Wald interval for paired
    proportions; the p-value is the exact two-sided binomial test on the b + c discordant
    problems (exact McNemar).
    """
    from scipy.stats import binomtest

    a_by = {r["problem_id"]: r["outcome"] == "correct" for r in base if r["sample"] == 0}
    b_by = {r["problem_id"]: r["outcome"] == "correct" for r in other if r["sample"] == 0}
    common = sorted(set(a_by) & set(b_by))
    n = len(common)
    both = sum(a_by[p] and b_by[p] for p in common)
    b = sum(a_by[p] and not b_by[p] for p in common)
    c = sum(not a_by[p] and b_by[p] for p in common)
    neither = n - both - b - c
    p_value = float(binomtest(c, b + c, 0.5).pvalue) if b + c else 1.0
    bs, cs, ns = b + 0.5, c + 0.5, n + 2
    diff_adj = (cs - bs) / ns
    se = math.sqrt(max(0.0, (bs + cs) - (cs - bs) ** 2 / ns)) / ns
    return {
        "n": n,
        "base_accuracy": (both + b) / n if n else 0.0,
        "other_accuracy": (both + c) / n if n else 0.0,
        "difference": (c - b) / n if n else 0.0,
        "ci95": [max(-1.0, diff_adj - 1.96 * se), min(1.0, diff_adj + 1.96 * se)],
        "table": {"both": both, "base_only": b, "other_only": c, "neither": neither},
        "p_value": p_value,
        "significant": p_value < 0.05,
        "test": "exact McNemar (two-sided binomial on discordant problems)",
        "valid_calls": paired_valid_calls(base, other),
    }


def _valid(call: Record) -> bool:
    return call["kind"] in ("ok", "function_error")


def paired_valid_calls(base: Sequence[Record], other: Sequence[Record]) -> dict[str, Any]:
    """Valid-call rates of two models on the same problems (sample 0), with an exact sign test.

    Each problem where both models made calls compares the share of valid calls in the two
    chains: `higher` counts the problems where the other model's share is higher, `lower`
    where it is lower; the p-value is the two-sided binomial test on those (ties dropped).
    The rates pool all calls of those problems.
    """
    from scipy.stats import binomtest

    a_by = {r["problem_id"]: r["calls"] for r in base if r["sample"] == 0 and r["calls"]}
    b_by = {r["problem_id"]: r["calls"] for r in other if r["sample"] == 0 and r["calls"]}
    common = sorted(set(a_by) & set(b_by))

    def share(calls: Sequence[Record]) -> float:
        return sum(map(_valid, calls)) / len(calls)

    changes = [share(b_by[p]) - share(a_by[p]) for p in common]
    higher, lower = sum(d > 0 for d in changes), sum(d < 0 for d in changes)
    p_value = float(binomtest(higher, higher + lower, 0.5).pvalue) if higher + lower else 1.0
    base_rate = share([c for p in common for c in a_by[p]]) if common else 0.0
    other_rate = share([c for p in common for c in b_by[p]]) if common else 0.0
    return {
        "n": len(common),
        "base_rate": base_rate,
        "other_rate": other_rate,
        "higher": higher,
        "lower": lower,
        "p_value": p_value,
        "significant": p_value < 0.05,
        "test": "exact sign test on per-problem valid-call shares",
    }


def metrics(
    records: Sequence[Record], problems: Sequence[Problem] | None = None, pair: tuple[str, str] = ("base", "dpo")
) -> dict[str, Any]:
    """`{"models": {label: {task: {...}}}, "paired": {task: {...}}, "comparisons": {...}}` for all evaluated records.

    `paired` compares `pair` (base and DPO); `comparisons` holds each pair of `COMPARISONS` that was evaluated,
    as `{"first vs second": {task: {...}}}`. Where the held-out FOL worlds have several sizes, each comparison
    also holds the same comparison within each size, as `by_nmax`."""
    by_id = {p.id: p for p in problems or []}
    groups: dict[str, dict[str, list[Record]]] = {}
    for r in records:
        groups.setdefault(r["source"], {}).setdefault(r["task"], []).append(r)
    models = {
        label: {task: summarize_model(rs, by_id or None) for task, rs in sorted(tasks.items())}
        for label, tasks in groups.items()
    }

    def compared(first: str, second: str) -> dict[str, Any]:
        if first not in groups or second not in groups:
            return {}
        out = {}
        for task in sorted(set(groups[first]) & set(groups[second])):
            a, b = groups[first][task], groups[second][task]
            out[task] = {"models": [first, second], **paired_test(a, b)}
            sizes_a, sizes_b = by_nmax(a, by_id), by_nmax(b, by_id)
            if len(sizes_a) > 1:  # held-out worlds of several sizes: the same comparison within each
                out[task]["by_nmax"] = {
                    k: {"models": [first, second], **paired_test(v, sizes_b.get(k, []))} for k, v in sizes_a.items()
                }
        return out

    out = {"models": models, "paired": compared(*pair)}
    comparisons = {f"{a} vs {b}": compared(a, b) for a, b in COMPARISONS if (a, b) != tuple(pair)}
    if any(comparisons.values()):
        out["comparisons"] = {name: c for name, c in comparisons.items() if c}
    return out


def significance_sentence(task: str, p: Mapping[str, Any]) -> str:
    """The paired comparison in words, saying plainly when it is not significant."""
    first, second = p["models"]
    diff = p["difference"] * 100
    ci = f"95% CI {p['ci95'][0] * 100:+.1f} to {p['ci95'][1] * 100:+.1f} points"
    t = p["table"]
    core = (
        f"{task}: {second} {p['other_accuracy']:.1%} vs {first} {p['base_accuracy']:.1%} "
        f"on the same {p['n']} problems, difference {diff:+.1f} points ({ci}); "
        f"{second} alone solved {t['other_only']}, {first} alone {t['base_only']}; "
        f"exact McNemar p = {p['p_value']:.3g}"
    )
    core += (
        ": significant at the 5% level."
        if p["significant"]
        else ": **not significant** at the 5% level; this difference could be chance."
    )
    v = p.get("valid_calls")
    if v and v["n"]:
        core += (
            f" Valid calls: {second} {v['other_rate']:.1%} vs {first} {v['base_rate']:.1%} "
            f"on the {v['n']} problems where both called; "
            f"{second}'s share higher on {v['higher']}, lower on {v['lower']}; sign test p = {v['p_value']:.3g}"
            + (" (significant)." if v["significant"] else " (**not significant**).")
        )
    return core


def run_failures(run_folder: str | Path, left_out_here: int = 0) -> dict[str, int]:
    """What failed or was left out along a run, from what its notebooks wrote ({what: count}, zeros included).

    Failed teacher chains and step requests (`chains/summary.json`), ledger lines kept aside
    as cut or damaged (`<file>.cut`, `<file>.damaged`), and damaged lines left out when
    reading, by notebook 03 (`pairs/stats.json`) and by the caller (`left_out_here`).
    """
    run_folder = Path(run_folder)
    summary_path = run_folder / "chains" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    failed_chains = sum(
        counts.get("error", 0)
        for source, by_task in summary.get("outcomes", {}).items()
        if source != "reference"
        for counts in by_task.values()
    )
    stats_path = run_folder / "pairs" / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    out = {
        "teacher chains that failed (request errors, retried on the next run)": failed_chains,
        "teacher step requests that failed (asked again on the next run)": summary.get("step_replies_failed", 0),
        "chain-file lines left out by notebook 03 (skip_damaged_lines)": stats.get("ledger_lines_left_out", 0),
        "result-file lines left out by notebook 05 (skip_damaged_lines)": left_out_here,
    }
    out.update({f"lines kept aside in {name}": n for name, n in set_aside_counts(run_folder).items()})
    return out


def write_report(
    run_folder: str | Path,
    m: Mapping[str, Any],
    params: Mapping[str, Any],
    figures: Sequence[str] = (),
    failures: Mapping[str, int] | None = None,
) -> Path:
    """`report.md` of a run, readable on its own: results, paired comparison, what failed, figures, parameters."""

    run_folder = Path(run_folder)
    lines = [
        f"# fclib study: run `{run_folder.name}`",
        "",
        "Accuracy counts verified correct chains on held-out test problems (a FOL chain must derive its answer "
        "from the facts it looked up); 95% Wilson intervals. The same agent, prompts and functions served "
        "generation, training and evaluation.",
        "",
        "| model | task | accuracy (95% CI) | n | answer right | valid calls | answered | calls per chain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, tasks in m["models"].items():
        for task, x in tasks.items():
            lines.append(
                f"| {label} | {task} | {x['accuracy']:.1%} ({x['ci95'][0]:.1%} to {x['ci95'][1]:.1%}) | {x['n']} | "
                f"{x['answer_accuracy']:.1%} | {x['valid_call_rate']:.1%} | {x['answered']:.1%} | "
                f"{x['mean_calls']:.1f} |"
            )
    faithful = {label: t["fol"] for label, t in m["models"].items() if "faithful" in t.get("fol", {})}
    if faithful:
        lines += [
            "",
            "Faithful FOL chains: verified, and every value passed on exactly as an earlier call returned it "
            "(a verified chain may miscopy a list of truth values and still reach the right result): "
            + "; ".join(
                f"{label} {round(x['faithful']['accuracy'] * x['n'])} of its {x['correct']} verified"
                for label, x in faithful.items()
            )
            + ".",
        ]
    by_nmax = {
        label: tasks["fol"]["by_nmax"] for label, tasks in m["models"].items() if "by_nmax" in tasks.get("fol", {})
    }
    if by_nmax:
        sizes = list(next(iter(by_nmax.values())))
        lines += [
            "",
            "## FOL by world size, as the paper reports it",
            "",
            "| model | " + " | ".join(f"nmax {k}" for k in sizes) + " | all |",
            "|---|" + "---|" * (len(sizes) + 1),
        ]
        for label, cells in by_nmax.items():
            whole = m["models"][label]["fol"]
            shown = [f"{cells[k]['accuracy']:.1%} (n={cells[k]['n']})" if k in cells else "-" for k in sizes]
            lines.append(f"| {label} | " + " | ".join(shown) + f" | {whole['accuracy']:.1%} (n={whole['n']}) |")
    lines += ["", "## Paired comparison", ""]
    if m["paired"]:
        for task, p in m["paired"].items():
            lines.append(f"- {significance_sentence(task, p)}")
            lines += [f"  - {significance_sentence(f'{task}, nmax {k}', q)}" for k, q in p.get("by_nmax", {}).items()]
    else:
        lines.append("Only one of the two models was evaluated: no paired comparison.")
    if m.get("comparisons"):
        lines += ["", "## Constrained decoding", "", "The `+grammar` models decode under their toolset's grammar.", ""]
        lines += [f"- {significance_sentence(task, p)}" for c in m["comparisons"].values() for task, p in c.items()]
    lines += [
        "",
        "## How the chains end",
        "",
        "| model | task | " + " | ".join(OUTCOMES) + " |",
        "|---|---|" + "---|" * len(OUTCOMES),
    ]
    for label, tasks in m["models"].items():
        for task, x in tasks.items():
            lines.append(f"| {label} | {task} | " + " | ".join(str(x["outcomes"][o]) for o in OUTCOMES) + " |")
    if failures is not None:
        lines += ["", "## What failed or was left out", ""]
        counted = {what: n for what, n in failures.items() if n}
        lines += [f"- {what}: {n}" for what, n in counted.items()] or [
            "Nothing: every request was answered and every ledger line was read."
        ]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({Path(f).as_posix()})" for f in figures]
    lines += ["", "## Parameters", "", "```yaml", yaml.safe_dump(dict(params), sort_keys=False).strip(), "```", ""]
    path = run_folder / "report.md"
    runs.write_atomic(path, "\n".join(lines))
    return path
