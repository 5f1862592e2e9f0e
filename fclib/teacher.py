"""Stage 2, teacher chains: each training problem solved k times, and a reply at every step of the reference chains.

    with open_teacher(model, url) as backend:
        records = generate(backend, problems, run_folder / "chains" / "chains.jsonl", k=4, config=config)
        steps = sample_steps(backend, problems, run_folder / "chains" / "steps.jsonl", references)

`generate` and the chain store are `fclib.chains` (stage 5 uses them too); this module adds
what only the teacher does. `sample_steps` asks the teacher for one more turn at every step of
each reference chain and labels each reply against the reference's own turn (`steps.jsonl`,
same resume rules as chains): the replies that fail or take another road become step-level
rejected turns in notebook 03, so a teacher that never finishes a chain still shows the
student what goes wrong at every step. `summarize` counts outcomes, yield and tokens.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fclib.agent import OUTCOMES, AgentConfig, check_constrained
from fclib.backends import ChatBackend, GenerationSettings, Reply, open_teacher
from fclib.backends.endpoint import url_fault
from fclib.chains import claim, fingerprint, key_of, resume, same_value
from fclib.models import model_fault
from fclib.problems import Problem
from fclib.protocol import CallSyntaxError, parse_call
from fclib.runs import jsonl_line, progress_bar
from fclib.settings import Settings
from fclib.tasks import TASKS

log = logging.getLogger(__name__)

STEP_VERDICTS = ("same", "same_function", "other_function", "wrong_answer", "invalid_call", "parse_error", "error")
REJECTED_VERDICTS = ("other_function", "wrong_answer", "invalid_call", "parse_error")
TEACHER_BACKENDS = ("inprocess", "server")
KEY_REFUSED = (
    "teacher_api_key_env takes the NAME of an environment variable that holds the key "
    "(e.g. OPENAI_API_KEY), never the key itself: the value given is refused and not shown"
)
API_KEY_PREFIXES = (  # what pasted keys start with (OpenAI, Stripe-style, Hugging Face, Groq, xAI, Google, GitHub, AWS)
    *("sk-", "sk_", "hf_", "pk_", "rk_", "gsk_", "xai-", "api_", "aiza", "ghp_", "gho_", "github_pat_", "akia"),
)


def is_variable_name(value: Any) -> bool:
    """An environment variable's name, and not something that looks like a pasted API key.

    A name is letters, digits and `_`, made of words (`OPENAI_API_KEY`): no known key prefix, no word longer
    than 20 characters, no word of 8 or more characters holding 3 digits or more (32 hex characters, a
    Google or AWS key without its prefix look like that; variable names do not).
    """
    text = str(value)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", text) or text.lower().startswith(API_KEY_PREFIXES):
        return False
    return all(len(w) <= 20 and not (len(w) >= 8 and sum(c.isdigit() for c in w) >= 3) for w in text.split("_"))


@dataclass
class TeacherSettings(Settings):
    """Notebook 02 (and the teacher of notebook 05): who the teacher is, how it is asked, how many chains.

    The agent's limits are `AgentConfig`'s; the defaults are the `cpu` profile's.
    """

    teacher: str = "embedded"  # local ('embedded', a folder) or, with teacher_url, the endpoint's model id
    teacher_url: str = ""  # OpenAI-compatible base URL; empty: a local teacher
    teacher_api_key_env: str = "OPENAI_API_KEY"  # NAME of the variable holding the key, never the key
    request_timeout: float = 60.0  # seconds an endpoint request may take before the openai client retries it
    kv_cache: bool = True  # speed-up (fclib.fast): a local model reuses keys and values across turns
    teacher_backend: str = "inprocess"  # local teacher: 'inprocess' or 'server' (transformers serve)
    k: int = 2  # chains per training problem
    temperature: float = 0.8  # teacher sampling temperature (0: greedy)
    concurrency: int = 16  # requests in flight (endpoint) or conversations per batch (in process)
    reference_chains: bool = True  # also store each problem's reference chain as source 'reference'
    step_samples: int = 1  # teacher replies at every step of each reference chain (0: none)
    price_prompt: float = 0.0  # USD per million prompt tokens, for the cost estimate
    price_completion: float = 0.0  # USD per million completion tokens
    skip_damaged_lines: bool = False  # a damaged line inside a chain file: stop (False) or set aside and redo
    protocol: str = "text"  # the agent's protocol (AgentConfig); step sampling needs 'text'
    teacher_grammar: bool = False  # a local teacher decodes under its toolset's grammar (AgentConfig.grammar)

    def faults(self) -> list[str]:
        wrong = []
        if self.step_samples and self.protocol != "text":
            wrong.append("step_samples > 0 samples replies in the text protocol: set protocol=text or step_samples=0")
        if self.k < 2:
            wrong.append(f"k={self.k}: preference pairs need at least 2 chains per problem (k >= 2)")
        if self.concurrency < 1:
            wrong.append("concurrency must be >= 1")
        if not self.request_timeout > 0:
            wrong.append(f"request_timeout must be > 0 seconds, got {self.request_timeout!r}")
        if self.temperature < 0 or self.price_prompt < 0 or self.price_completion < 0:
            wrong.append("temperature, price_prompt and price_completion must be >= 0")
        if self.step_samples < 0:
            wrong.append("step_samples must be >= 0")
        if self.step_samples and not self.reference_chains:
            wrong.append("step_samples > 0 samples along the reference chains: set reference_chains=true")
        if self.teacher_backend not in TEACHER_BACKENDS:
            wrong.append(f"teacher_backend must be inprocess or server, not {self.teacher_backend!r}")
        fault = url_fault(self.teacher_url, "teacher_url") or (None if self.teacher_url else model_fault(self.teacher))
        if fault:
            wrong.append(fault if self.teacher_url else f"teacher: {fault}")
        if self.teacher_grammar and (
            self.teacher_url or self.teacher_backend != "inprocess" or self.protocol != "text"
        ):
            wrong.append(
                "teacher_grammar needs a local teacher in process (no teacher_url, teacher_backend inprocess)"
                " and protocol text"
            )
        if not is_variable_name(self.teacher_api_key_env):
            wrong.append(KEY_REFUSED)
        return wrong

    @contextmanager
    def open(self, log_dir: str | Path | None = None) -> Iterator[ChatBackend]:
        """The teacher as a chat backend for the life of a `with` block (`fclib.backends.open_teacher`)."""
        with open_teacher(
            self.teacher,
            self.teacher_url,
            self.teacher_backend,
            self.concurrency,
            self.teacher_api_key_env,
            log_dir,
            request_timeout=self.request_timeout,
            kv_cache=self.kv_cache,
        ) as backend:
            yield backend

    def prices(self) -> dict[str, float] | None:
        """USD per million prompt and completion tokens, or None when no price is given."""
        if not (self.price_prompt or self.price_completion):
            return None
        return {"prompt": self.price_prompt, "completion": self.price_completion}


def step_verdict(reply_text: str, reference: Mapping[str, Any], turn: int, toolset: Any) -> tuple[str, str | None, str]:
    """(verdict, function called, error) of a reply at `turn` of a reference chain.

    `same`: the reference's own text; `same_function`: another valid call of the function the
    reference calls there (another lookup, say); `other_function`: a valid call of another one
    (answering before the facts are in, or looking up after they are); `wrong_answer`: the
    final function with another value than the reference's; `invalid_call`, `parse_error`: no
    usable call. The last four are rejected turns (`REJECTED_VERDICTS`). A seventh
    verdict, `error`, is `sample_steps`'s own: the request failed, and the next run asks again.
    """
    ref_text = reference["messages"][turn]["content"]
    if reply_text.strip() == ref_text.strip():
        return "same", None, ""
    ref_call = reference["calls"][
        sum(m["role"] == "assistant" for m in reference["messages"][reference["n_prompt"] : turn])
    ]
    try:
        call = parse_call(reply_text, known=set(toolset.functions))
    except CallSyntaxError as e:
        return "parse_error", None, str(e)
    execution = toolset.execute(call)
    if not execution.ok:
        return "invalid_call", call.name, execution.error or ""
    if execution.name != ref_call["name"]:
        return "other_function", execution.name, ""
    if execution.final and not same_value(execution.value, ref_call["result"]):
        return "wrong_answer", execution.name, ""
    return "same_function", execution.name, ""


def sample_steps(
    backend: ChatBackend,
    problems: Sequence[Problem],
    path: str | Path,
    references: Sequence[Mapping[str, Any]],
    samples: int = 1,
    config: AgentConfig | None = None,
    source: str = "teacher",
    chunk_size: int = 64,
    overwrite: bool = False,
    progress: bool = True,
    skip_damaged: bool = False,
) -> list[dict[str, Any]]:
    """At every assistant turn of each reference chain, `samples` teacher replies, labelled.

    A reply is asked for with the reference's history up to that turn as the conversation, with
    the agent's sampling settings and a seed per (problem, turn, sample). Each record holds
    the reply, its verdict (`step_verdict`) and where it belongs: `turn` (index of the
    reference's message it stands for), `reference_sample`. Records are appended to `path` as
    each chunk of `chunk_size` replies ends. A failed request is stored too, with verdict
    `error` and the error, counted on the progress bar and in a warning; a rerun skips what is
    there and asks again for the failed ones; other settings refuse and damaged lines stop
    the run (or, with `skip_damaged`, are set aside), as in `generate`.
    Returns this source's records for these references (failed ones included), in reference
    then turn order.
    """
    if samples < 1 or chunk_size < 1:
        raise ValueError("samples and chunk_size must be at least 1")
    config = config or AgentConfig()
    if config.native_tools:
        raise ValueError("step sampling speaks the text protocol: set protocol='text' or step_samples=0")
    check_constrained(backend, config)
    by_id = {p.id: p for p in problems}
    references = [r for r in references if r["problem_id"] in by_id]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    claim(path, source, {**fingerprint(backend, config), "samples": samples}, overwrite)
    records = resume(path, source, "verdict", skip_damaged)
    done = {key_of(r) for r in records}
    jobs = []  # (reference, turn, step, sample index in the file)
    for ref in references:
        turns = [i for i in range(ref["n_prompt"], len(ref["messages"])) if ref["messages"][i]["role"] == "assistant"]
        for step, turn in enumerate(turns):
            for s in range(samples):
                jobs.append((ref, turn, step, step * samples + s))
    wanted = {(source, ref["problem_id"], k): n for n, (ref, _, _, k) in enumerate(jobs)}
    todo = [j for j in jobs if (source, j[0]["problem_id"], j[3]) not in done]
    counts = {"rejected": 0, "failed": 0}
    new: list[dict[str, Any]] = []
    bar = progress_bar(
        total=len(jobs), initial=len(jobs) - len(todo), desc=f"steps ({source})", unit="reply", disable=not progress
    )
    with open(path, "a", encoding="utf-8") as out:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            settings = GenerationSettings(
                max_tokens=config.max_tokens_per_turn,
                temperature=config.temperature,
                top_p=config.top_p,
                seed=config.seed,
                stop=config.stop,
                seeds=tuple(
                    zlib.crc32(f"{config.seed}:step:{ref['problem_id']}:{turn}:{k}".encode()) & 0x7FFFFFFF
                    for ref, turn, _, k in chunk
                ),
                grammars=tuple(TASKS[ref["task"]].toolset(by_id[ref["problem_id"]]).grammar() for ref, *_ in chunk)
                if config.grammar
                else (),
                remember=False,  # each of these conversations is sent once
            )
            try:
                replies = backend.chat(
                    [[dict(m) for m in ref["messages"][:turn]] for ref, turn, _, _ in chunk], settings
                )
            except Exception as e:  # the backend is outside our control: every reply of the chunk failed
                log.exception("step sampling: a backend call failed for %d replies", len(chunk))
                replies = [Reply("", 0, 0, "error", error=f"{type(e).__name__}: {e}"[:500]) for _ in chunk]
            for (ref, turn, step, k), reply in zip(chunk, replies):
                base = {
                    "source": source,
                    "problem_id": ref["problem_id"],
                    "task": ref["task"],
                    "sample": k,
                    "reference_source": ref["source"],
                    "reference_sample": ref["sample"],
                    "turn": turn,
                    "step": step,
                    "model": backend.model_id,
                }
                usage = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens}
                if reply.error is not None:
                    new.append(
                        {
                            **base,
                            "text": reply.text,
                            "verdict": "error",
                            "function": None,
                            "error": reply.error,
                            "usage": usage,
                            "retries": reply.retries,
                        }
                    )
                    counts["failed"] += 1
                else:
                    problem = by_id[ref["problem_id"]]
                    verdict, name, error = step_verdict(reply.text, ref, turn, TASKS[ref["task"]].toolset(problem))
                    new.append(
                        {
                            **base,
                            "text": reply.text,
                            "verdict": verdict,
                            "function": name,
                            "error": error,
                            "usage": usage,
                        }
                    )
                    counts["rejected"] += verdict in REJECTED_VERDICTS
                out.write(jsonl_line(new[-1]))
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(chunk))
            bar.set_postfix(counts, refresh=False)
    bar.close()
    if counts["failed"]:
        log.warning(
            "step sampling: %d of %d requests failed (verdict 'error' in %s); they are asked again on the next run",
            counts["failed"],
            len(todo),
            path,
        )
    return sorted((r for r in records + new if key_of(r) in wanted), key=lambda r: wanted[key_of(r)])


def summarize(records: Sequence[Mapping[str, Any]], prices: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Counts a reader wants after generation.

    - `outcomes`: {source: {task: {outcome: chains}}}
    - `yield`: {source: {task: {problems, with_correct, with_incorrect, with_both, share_with_both}}},
      where incorrect means a finished chain that is not correct (errors are not the model's);
      problems with both are the ones that give preference pairs.
    - `tokens`: {source: {prompt_tokens, completion_tokens, chains, retries, latency_s}}, with
      `cost` when `prices` gives USD per million tokens as {"prompt": .., "completion": ..}.
    """
    outcomes: dict[str, dict[str, dict[str, int]]] = {}
    per_problem: dict[tuple[str, str, str], set[str]] = {}
    tokens: dict[str, dict[str, float]] = {}
    for r in records:
        src, task = r.get("source", r["model"]), r["task"]
        counts = outcomes.setdefault(src, {}).setdefault(task, dict.fromkeys(OUTCOMES, 0))
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        kinds = per_problem.setdefault((src, task, r["problem_id"]), set())
        if r["outcome"] == "correct":
            kinds.add("correct")
        elif r["outcome"] != "error":
            kinds.add("incorrect")
        t = tokens.setdefault(
            src, {"chains": 0, "prompt_tokens": 0, "completion_tokens": 0, "retries": 0, "latency_s": 0.0}
        )
        t["chains"] += 1
        t["prompt_tokens"] += r["usage"]["prompt_tokens"]
        t["completion_tokens"] += r["usage"]["completion_tokens"]
        t["retries"] += r.get("retries", 0)
        t["latency_s"] += r.get("latency_s", 0.0)
    yields: dict[str, dict[str, dict[str, float]]] = {}
    for (src, task, _), kinds in per_problem.items():
        y = yields.setdefault(src, {}).setdefault(
            task, {"problems": 0, "with_correct": 0, "with_incorrect": 0, "with_both": 0}
        )
        y["problems"] += 1
        y["with_correct"] += "correct" in kinds
        y["with_incorrect"] += "incorrect" in kinds
        y["with_both"] += kinds == {"correct", "incorrect"}
    for by_task in yields.values():
        for y in by_task.values():
            y["share_with_both"] = y["with_both"] / y["problems"]
    if prices:
        for t in tokens.values():
            t["cost"] = (
                t["prompt_tokens"] * prices.get("prompt", 0) + t["completion_tokens"] * prices.get("completion", 0)
            ) / 1e6
    return {"outcomes": outcomes, "yield": yields, "tokens": tokens}
