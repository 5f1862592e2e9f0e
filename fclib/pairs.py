"""Preference pairs from labelled chains, in the conversational format TRL's DPOTrainer reads.

A pair is (prompt, chosen, rejected) for one problem: the prompt exactly as the agent sent it
(system message with the functions, the worked example, the problem), the chosen completion
from a verified correct chain, the rejected one from a finished incorrect chain. Completions
are message lists: the assistant's calls and the function results between them.

Strategies (`strategy=`):
- `all`: every correct x incorrect pair of a problem, at most `max_pairs_per_problem`
  (a seeded sample when there are more).
- `random`: one seeded random pair per problem.
- `first_divergence`: the two chains share a history up to the first assistant turn where
  they differ; the prompt is that shared history, chosen and rejected are the two next
  assistant turns alone. The model is then trained on its own decisions only, never on
  function-result tokens (TRL scores every token of a multi-message completion).

With `use_reference=True`, the task's reference chains serve as chosen for the problems the
teacher never solved. Pairs are split into train and validation *by problem*, seeded, so the
same inputs give a byte-identical dataset.

Step pairs (`steps=`, the teacher's labelled replies at each turn of a reference chain, from
`fclib.teacher.sample_steps`): the reference's history up to a turn is the prompt, its own
turn is chosen, a teacher reply there that failed or took another road is rejected. They join
the problem's other candidates under the same cap, whatever the strategy (`strategy: "step"`
in the pair), and reach every step of the chain, the final answer included, where a weak
teacher's whole chains part from the reference at their first call or two.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fclib.chains import verified
from fclib.runs import check_fields, check_messages, jsonl_line, read_jsonl
from fclib.settings import Settings
from fclib.teacher import REJECTED_VERDICTS

STRATEGIES = ("all", "random", "first_divergence")
PAIR_KINDS = ("chains", "steps")  # whole-chain pairs (by strategy) and step pairs (notebook 02's step replies)
REFERENCE = "reference"
STEP_SUFFIX = "-step"  # source of a step reply as a rejected one-turn chain: "<teacher>-step"
Record = Mapping[str, Any]
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class PairSet:
    """The pairs of a run, split by problem, and what happened to the candidates."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)


def incorrect(record: Record) -> bool:
    """A finished chain that failed: a wrong (or unverified) answer, no answer, bad calls, too many steps."""
    return record["outcome"] not in ("correct", "error") and record.get("source") != REFERENCE


def prompt_of(record: Record) -> list[dict[str, Any]]:
    return [dict(m) for m in record["messages"][: record["n_prompt"]]]


def completion_of(record: Record) -> list[dict[str, Any]]:
    """The chain after its prompt, ending at its last assistant turn (trailing feedback dropped)."""
    rest = [dict(m) for m in record["messages"][record["n_prompt"] :]]
    while rest and rest[-1]["role"] != "assistant":
        rest.pop()
    return rest


def _divergence(chosen: Record, rejected: Record) -> dict[str, Any] | None:
    """Prompt = shared history; chosen/rejected = the first assistant turns that differ."""
    a, b = chosen["messages"], rejected["messages"]
    i = chosen["n_prompt"]
    while i < len(a) and i < len(b) and a[i] == b[i]:
        i += 1
    if i >= len(a) or i >= len(b) or a[i]["role"] != "assistant" or b[i]["role"] != "assistant":
        return None
    call = 1 + sum(m["role"] == "assistant" for m in a[chosen["n_prompt"] : i])  # which of the chain's calls it trains
    return {
        "prompt": [dict(m) for m in a[:i]],
        "chosen": [dict(a[i])],
        "rejected": [dict(b[i])],
        "step": i - chosen["n_prompt"],
        "call": call,
    }


def _pair(chosen: Record, rejected: Record, strategy: str) -> tuple[dict[str, Any] | None, str]:
    """One pair, or None and why not."""
    if prompt_of(chosen) != prompt_of(rejected) or chosen.get("tools") != rejected.get("tools"):
        return None, "prompts differ (other protocol or settings)"
    if strategy == "first_divergence":
        body = _divergence(chosen, rejected)
        if body is None:
            return None, "no diverging assistant turn"
    else:
        body = {
            "prompt": prompt_of(chosen),
            "chosen": completion_of(chosen),
            "rejected": completion_of(rejected),
            "step": 0,
            "call": 1,
        }
    if not body["chosen"] or not body["rejected"]:
        return None, "empty completion"
    if body["chosen"] == body["rejected"]:
        return None, "chosen identical to rejected"
    pair = {
        "problem_id": chosen["problem_id"],
        "task": chosen["task"],
        "strategy": strategy,
        **body,
        "chosen_source": chosen["source"],
        "chosen_sample": chosen["sample"],
        "rejected_source": rejected["source"],
        "rejected_sample": rejected["sample"],
        "rejected_outcome": rejected["outcome"],
    }
    if chosen.get("tools"):
        pair["tools"] = list(chosen["tools"])  # the OpenAI tools schemas, as TRL reads them
    return pair, ""


def tools_of(pair: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The tools schemas of a pair (None under the text protocol); pair files of older runs hold them as JSON text."""
    tools = pair.get("tools")
    return json.loads(tools) if isinstance(tools, str) else tools or None


@dataclass
class PairSettings(Settings):
    """Notebook 03: how chains become pairs; the defaults are the `cpu` profile's."""

    seed: int = 0
    pair_strategy: str = "first_divergence"  # one of STRATEGIES
    max_pairs_per_problem: int = 8  # cap per problem (whole-chain and step pairs together)
    use_reference: bool = True  # reference chains as chosen where the teacher never succeeded
    validation_share: float = 0.1  # share of problems held out for validation (split by problem)
    max_length: int = 1280  # pairs longer than this many student tokens are dropped (training uses it too)
    step_samples: int = 1  # notebook 02's teacher replies per reference step; 0: no step pairs
    pair_kinds: list[str] = field(default_factory=lambda: list(PAIR_KINDS))  # which pairs to make (ablations)
    skip_damaged_lines: bool = False  # a damaged line inside a chain file: stop (False) or leave it out

    def faults(self) -> list[str]:
        wrong = []
        if self.pair_strategy not in STRATEGIES:
            wrong.append(f"pair_strategy must be one of {', '.join(STRATEGIES)}, not {self.pair_strategy!r}")
        if not 0 <= self.validation_share < 1:
            wrong.append("validation_share must be in [0, 1)")
        if self.max_pairs_per_problem < 1:
            wrong.append("max_pairs_per_problem must be >= 1")
        if self.max_length < 16:
            wrong.append(f"max_length must be >= 16, got {self.max_length}")
        if not self.pair_kinds or not set(self.pair_kinds) <= set(PAIR_KINDS):
            wrong.append(f"pair_kinds must be a non-empty list of {', '.join(PAIR_KINDS)}, not {self.pair_kinds!r}")
        return wrong

    def build(
        self, records: Sequence[Record], tokenizer: Any, steps: Sequence[Record] = (), strategy: str | None = None
    ) -> PairSet:
        """`build_pairs` with these settings (`strategy` replaces pair_strategy, to compare strategies)."""
        return build_pairs(
            records,
            strategy=strategy or self.pair_strategy,
            max_pairs_per_problem=self.max_pairs_per_problem,
            use_reference=self.use_reference,
            validation_share=self.validation_share,
            seed=self.seed,
            tokenizer=tokenizer,
            max_length=self.max_length,
            steps=steps,
            kinds=self.pair_kinds,
        )


def build_pairs(
    records: Sequence[Record],
    strategy: str = "first_divergence",
    max_pairs_per_problem: int = 8,
    use_reference: bool = True,
    validation_share: float = 0.1,
    seed: int = 0,
    tokenizer: Any = None,
    max_length: int | None = None,
    steps: Sequence[Record] = (),
    kinds: Sequence[str] = PAIR_KINDS,
) -> PairSet:
    """Pairs from chain records (see the module docstring); `stats` says what was kept and dropped.

    `kinds` says which pairs to make: "chains" (a verified chain against an incorrect one, by
    `strategy`) and "steps" (step pairs, from `steps`); the default makes both.

    With a `tokenizer` (the student's), each pair's prompt+chosen and prompt+rejected are
    rendered with its chat template and counted; pairs longer than `max_length` tokens are
    dropped and counted.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    if not kinds or not set(kinds) <= set(PAIR_KINDS):
        raise ValueError(f"kinds must be a non-empty list of {', '.join(PAIR_KINDS)}, not {kinds!r}")
    if max_pairs_per_problem < 1 or not 0 <= validation_share < 1:
        raise ValueError("max_pairs_per_problem must be >= 1 and validation_share in [0, 1)")
    if max_length is not None and tokenizer is None:
        raise ValueError("max_length needs the student's tokenizer to count tokens")
    if not records:
        raise ValueError("no chains given: run notebook 02 first")
    missing = {
        "problem_id",
        "task",
        "source",
        "sample",
        "messages",
        "n_prompt",
        "calls",
        "outcome",
        "final_answer",
    } - set(records[0])
    if missing:
        raise ValueError(f"chain records lack {sorted(missing)}: not a chains.jsonl of this project?")

    by_problem: dict[str, list[Record]] = {}
    for r in records:
        by_problem.setdefault(r["problem_id"], []).append(r)
    steps_by_problem: dict[str, list[Record]] = {}
    for st in steps:
        if st["verdict"] in REJECTED_VERDICTS:
            steps_by_problem.setdefault(st["problem_id"], []).append(st)
    dropped: Counter[str] = Counter()
    pairs_by_problem: dict[str, list[dict[str, Any]]] = {}
    for pid in sorted(by_problem):
        chains = sorted(by_problem[pid], key=lambda r: (r["source"], r["sample"]))
        chosen = [r for r in chains if r["source"] != REFERENCE and verified(r)]
        unverified = [r for r in chains if r["source"] != REFERENCE and r["outcome"] == "correct" and not verified(r)]
        dropped["correct but not verified (not used as chosen)"] += len(unverified)
        if not chosen and use_reference:
            chosen = [r for r in chains if r["source"] == REFERENCE and verified(r)]
        rejected = [r for r in chains if incorrect(r)] if "chains" in kinds else []
        step_combos = _step_candidates(chains, steps_by_problem.get(pid, [])) if "steps" in kinds else []
        if (not chosen or not rejected) and not step_combos:
            dropped[f"problems without {'a verified correct' if not chosen else 'an incorrect'} chain"] += 1
            continue
        rng = random.Random(f"{seed}:{pid}")
        combos = [(c, r, False) for c in chosen for r in rejected] + [(c, r, True) for c, r in step_combos]
        rng.shuffle(combos)
        cap = 1 if strategy == "random" else max_pairs_per_problem
        kept, seen = [], set()
        for c, r, step in combos:
            if len(kept) == cap:
                break
            pair, why = _pair(c, r, "first_divergence" if step else strategy)
            if pair is not None and step:
                pair["strategy"] = "step"
            if pair is None:
                dropped[why] += 1
                continue
            sig = json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]], sort_keys=True)
            if sig in seen:
                dropped["duplicate pair"] += 1
                continue
            if tokenizer is not None:
                pair["chosen_tokens"], pair["rejected_tokens"], pair["prompt_tokens"] = _lengths(tokenizer, pair)
                if (
                    max_length is not None
                    and pair["prompt_tokens"] + max(pair["chosen_tokens"], pair["rejected_tokens"]) > max_length
                ):
                    dropped[f"longer than max_length={max_length} tokens"] += 1
                    continue
            seen.add(sig)
            kept.append(pair)
        if kept:
            pairs_by_problem[pid] = kept

    problems = sorted(pairs_by_problem)
    random.Random(f"split-{seed}").shuffle(problems)
    n_val = round(validation_share * len(problems))
    if validation_share > 0 and n_val == 0 and len(problems) >= 2:
        n_val = 1
    val_ids = set(problems[:n_val])
    train = [p for pid in sorted(pairs_by_problem) if pid not in val_ids for p in pairs_by_problem[pid]]
    validation = [p for pid in sorted(pairs_by_problem) if pid in val_ids for p in pairs_by_problem[pid]]
    stats = _stats(
        records, train, validation, dropped, strategy, max_pairs_per_problem, use_reference, seed, max_length
    )
    stats["kinds"] = list(kinds)
    return PairSet(train, validation, stats)


def _step_candidates(chains: Sequence[Record], steps: Sequence[Record]) -> list[tuple[Record, Record]]:
    """(reference chain, one-turn rejected chain) for each rejected step reply of one problem."""
    refs = {(r["source"], r["sample"]): r for r in chains if r["source"] == REFERENCE and verified(r)}
    out = []
    for st in steps:
        ref = refs.get((st.get("reference_source", REFERENCE), st["reference_sample"]))
        if ref is None or st["turn"] >= len(ref["messages"]):
            continue
        reply = {"role": "assistant", "content": st["text"]}
        out.append(
            (
                ref,
                {
                    **ref,
                    "source": st["source"] + STEP_SUFFIX,
                    "sample": st["sample"],
                    "outcome": st["verdict"],
                    "messages": [dict(m) for m in ref["messages"][: st["turn"]]] + [reply],
                },
            )
        )
    return out


def _lengths(tokenizer: Any, pair: Mapping[str, Any]) -> tuple[int, int, int]:
    """Completion tokens of chosen and rejected, and prompt tokens, by the student's chat template."""
    tools = tools_of(pair)

    def count(messages: list[dict[str, Any]], generation_prompt: bool = False) -> int:
        text = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
        )
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompt = count(pair["prompt"], generation_prompt=True)
    return count(pair["prompt"] + pair["chosen"]) - prompt, count(pair["prompt"] + pair["rejected"]) - prompt, prompt


def _summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "mean": round(statistics.fmean(values), 2),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def _stats(records, train, validation, dropped, strategy, cap, use_reference, seed, max_length) -> dict[str, Any]:
    all_pairs = train + validation
    per_task: dict[str, dict[str, Any]] = {}
    for task in sorted({r["task"] for r in records}):
        problems = {r["problem_id"] for r in records if r["task"] == task}
        with_pairs = {p["problem_id"] for p in all_pairs if p["task"] == task}
        per_task[task] = {
            "problems": len(problems),
            "problems_with_pairs": len(with_pairs),
            "pair_yield": round(len(with_pairs) / len(problems), 4) if problems else 0.0,
            "train_pairs": sum(p["task"] == task for p in train),
            "validation_pairs": sum(p["task"] == task for p in validation),
            "chosen_from_reference": sum(p["task"] == task and p["chosen_source"] == REFERENCE for p in all_pairs),
        }
    lengths = {}
    if all_pairs and "chosen_tokens" in all_pairs[0]:
        lengths = {
            side: _summary([p[f"{side}_tokens"] for p in all_pairs]) for side in ("prompt", "chosen", "rejected")
        }
    return {
        "strategy": strategy,
        "max_pairs_per_problem": cap,
        "use_reference": use_reference,
        "seed": seed,
        "max_length": max_length,
        "chains": len(records),
        "train_pairs": len(train),
        "validation_pairs": len(validation),
        "train_problems": len({p["problem_id"] for p in train}),
        "validation_problems": len({p["problem_id"] for p in validation}),
        "per_task": per_task,
        "rejected_outcomes": dict(sorted(Counter(p["rejected_outcome"] for p in all_pairs).items())),
        "step_pairs": sum(p["strategy"] == "step" for p in all_pairs),
        "train_pairs_by_call": {str(k): v for k, v in sorted(Counter(p["call"] for p in train).items())},
        "dropped": dict(sorted(dropped.items())),
        "completion_tokens": lengths,
    }


CARD = """# Preference pairs: {run_name}

Pairs for DPO built by fclib from the chains of `chains/chains.jsonl` (notebook 03). Conversational
format: `prompt`, `chosen`, `rejected` are message lists as TRL's `DPOTrainer` reads them
(a `tools` column holds each pair's OpenAI tools schemas when the native protocol was used).

- Strategy: `{strategy}` (at most {cap} pairs per problem); reference chains as chosen: {use_reference}.
- Chosen: verified correct chains (the answer equals the gold one and what the chain's own calls
  computed; FOL chains must also have looked up the facts). Rejected: finished incorrect chains.
- Step pairs ({step_pairs}): the reference chain's turn at one step chosen, a teacher reply at that
  step that failed or called another function rejected (`strategy` "step").
- Split by problem (seed {seed}): {train_pairs} train pairs from {train_problems} problems,
  {validation_pairs} validation pairs from {validation_problems} problems; no problem on both sides.

| task | problems | with pairs | yield | train pairs | validation pairs | chosen from reference |
|---|---|---|---|---|---|---|
{task_rows}

Completion lengths in student tokens (chosen vs rejected): {lengths}.
A large gap is a bias a model can learn instead of correctness.

Dropped: {dropped}.
"""


def save_pairs(pairs: PairSet, folder: str | Path, run_name: str = "") -> Path:
    """Write `train.jsonl`, `validation.jsonl`, a `datasets` DatasetDict (`dataset/`), `stats.json`, `README.md`.

    All of them or none: they are written into a new folder beside `folder`, which then takes its place (a kill
    at any point leaves the old pairs or the new, never some of each).
    """
    folder = Path(folder)
    for left in folder.parent.glob(f".{folder.name}.*-*"):  # what a kill during an earlier save left
        shutil.rmtree(left, ignore_errors=True)
    new = folder.with_name(f".{folder.name}.new-{os.getpid()}")
    _write_pairs(pairs, new, run_name or folder.parent.name)
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def _write_pairs(pairs: PairSet, folder: Path, run_name: str) -> None:
    from datasets import DatasetDict

    folder.mkdir(parents=True)
    for name, rows in (("train", pairs.train), ("validation", pairs.validation)):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(jsonl_line(row, sort_keys=True))
    (folder / "stats.json").write_text(json.dumps(pairs.stats, indent=2, sort_keys=True) + "\n")
    s = pairs.stats
    rows = "\n".join(
        f"| {t} | {v['problems']} | {v['problems_with_pairs']} | {v['pair_yield']:.1%} | {v['train_pairs']} | "
        f"{v['validation_pairs']} | {v['chosen_from_reference']} |"
        for t, v in s["per_task"].items()
    )
    lengths = s["completion_tokens"]
    shown = (
        f"chosen mean {lengths['chosen'].get('mean')}, rejected mean {lengths['rejected'].get('mean')}"
        if lengths
        else "not counted"
    )
    dropped = ", ".join(f"{v} {k}" for k, v in s["dropped"].items()) or "nothing"
    (folder / "README.md").write_text(
        CARD.format(
            run_name=run_name,
            strategy=s["strategy"],
            cap=s["max_pairs_per_problem"],
            use_reference=s["use_reference"],
            seed=s["seed"],
            train_pairs=s["train_pairs"],
            train_problems=s["train_problems"],
            validation_pairs=s["validation_pairs"],
            validation_problems=s["validation_problems"],
            step_pairs=s.get("step_pairs", 0),
            task_rows=rows,
            lengths=shown,
            dropped=dropped,
        )
    )
    splits = {name: _dataset(rows) for name, rows in (("train", pairs.train), ("validation", pairs.validation)) if rows}
    DatasetDict(splits).save_to_disk(str(folder / "dataset"))


def _dataset(rows: Sequence[Mapping[str, Any]]) -> Any:
    """The rows as a Dataset; a `tools` column holds each row's own list of schemas (Json), as TRL reads it.

    Left to Arrow's inference, schemas of different toolsets would merge into one struct whose
    missing fields read back as None, and the chat template would render those.
    """
    from datasets import Dataset, Features, Json, List

    rows = [_utf8({**row, "tools": tools_of(row)}) for row in rows]
    data = Dataset.from_list([{k: v for k, v in row.items() if k != "tools"} for row in rows])
    if not any(row["tools"] for row in rows):
        return data
    return Dataset.from_list(rows, features=Features({**data.features, "tools": List(Json())}))


def _utf8(value: Any) -> Any:
    """`value` with every surrogate code point (text UTF-8 cannot encode) replaced by U+FFFD.

    Arrow and the tokenizers need valid UTF-8, so the training dataset carries U+FFFD where a model
    returned a lone surrogate; `train.jsonl` and `validation.jsonl` keep the exact text.
    """
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {k: _utf8(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_utf8(v) for v in value]
    return value


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """The pair rows of a `train.jsonl` or `validation.jsonl`; a bad line raises naming file, line and fault."""
    return read_jsonl(path, _check_pair)


def _check_pair(row: Any) -> dict[str, Any]:
    """`row` once checked to be a pair; ValueError naming what is wrong otherwise."""
    check_fields(row, {"problem_id": str, "prompt": list, "chosen": list, "rejected": list}, "a pair")
    tools = row.get("tools")
    if tools is not None and not isinstance(tools, str) and not all(isinstance(t, dict) for t in tools or [0]):
        raise ValueError("field 'tools' must be a list of tool schemas (objects)")
    for name in ("prompt", "chosen", "rejected"):
        if not row[name]:
            raise ValueError(f"field {name!r} must be a non-empty list of messages")
        check_messages(row[name], name)
    return row


def load_pairs(folder: str | Path) -> Any:
    """The pairs of `folder` as a DatasetDict ready for DPOTrainer (train and, when any, validation).

    Read from `train.jsonl` and `validation.jsonl` (the exact text, checked line by line; an
    edit there is what trains), with text UTF-8 cannot encode replaced as in `save_pairs`.
    """
    from datasets import DatasetDict

    folder = Path(folder)
    if not (folder / "train.jsonl").is_file():
        raise FileNotFoundError(f"no preference pairs at {folder / 'train.jsonl'}: run notebook 03 first")
    splits = {}
    for name in ("train", "validation"):
        rows = read_pairs(folder / f"{name}.jsonl") if (folder / f"{name}.jsonl").is_file() else []
        if rows:
            splits[name] = _dataset(rows)
    return DatasetDict(splits)  # without "train" when notebook 03 kept no pair: training says so
