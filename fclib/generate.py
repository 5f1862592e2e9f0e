"""Teacher chain generation: each training problem solved k times, each chain saved as it ends.

    records = generate(backend, problems, run_dir / "chains" / "chains.jsonl", k=4, config=config)

Every chain is appended to the JSONL file the moment it ends, so a run killed at any point
loses only the chains in flight. Started again with the same parameters, it skips every
finished chain, retries the ones that ended in `error` (a failed request, not a wrong
answer), and sets a cut last line aside in `<file>.cut` (whatever byte it was cut at); any
other unreadable line stops the run with its file and line number, or with `skip_damaged`
is set aside in `<file>.damaged` and its chain redone. Chains are keyed by
(source, problem, sample); the file never holds two records of one key.

Several sources may share a file: a teacher endpoint, the task's reference chains
(`source="reference"`). The settings each source was generated with are kept beside the
file (`chains.meta.json`); asking for the same source with settings that would give other
chains refuses with the differences, unless `overwrite=True`, which moves the old chains of
that source aside to a backup file. Never a silent mix.

`sample_steps` asks the teacher for one more turn at every step of each reference chain and
labels each reply against the reference's own turn (`steps.jsonl`, same resume rules): the
replies that fail or take another road become step-level rejected turns in notebook 03, so a
teacher that never finishes a chain still shows the student what goes wrong at every step.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from fclib.agent import AgentConfig, Chain, Task, run_chains
from fclib.llm import ChatBackend
from fclib.problems import Problem
from fclib.runs import BadLine, check_fields, check_messages, fault_of, jsonl_line, progress_bar, read_record

log = logging.getLogger(__name__)
Key = tuple[str, str, int]


@contextmanager
def open_teacher(
    model: str,
    url: str = "",
    backend: str = "inprocess",
    concurrency: int = 8,
    api_key_env: str = "OPENAI_API_KEY",
    log_dir: str | Path | None = None,
    request_timeout: float = 60.0,
) -> Iterator[ChatBackend]:
    """The teacher as a chat backend, for the life of a `with` block.

    - `url` given: the OpenAI-compatible endpoint at `url`, serving `model`; the key comes from
      $`api_key_env`; checked at once (reachable, model served); a request that takes longer
      than `request_timeout` seconds is retried by the openai client.
    - else `backend="server"`: `transformers serve` with the local `model` on 127.0.0.1,
      stopped when the block ends.
    - else `backend="inprocess"`: the local `model` in this process, `concurrency`
      conversations per batch.
    """
    from fclib.llm import LocalBackend, OpenAIBackend
    from fclib.serve import LocalServer

    if url:
        client = OpenAIBackend(url, model, concurrency=concurrency, api_key_env=api_key_env, timeout=request_timeout)
        client.check()
        yield client
    elif backend == "server":
        with LocalServer(model, log_path=Path(log_dir) / "server.log" if log_dir else None) as server:
            client = server.backend(concurrency=concurrency, timeout=request_timeout)
            client.check()
            yield client
    elif backend == "inprocess":
        yield LocalBackend.load(model, batch_size=concurrency)
    else:
        raise ValueError(f"teacher backend must be 'inprocess' or 'server' (or give a URL), not {backend!r}")


def key_of(record: Mapping[str, Any]) -> Key:
    return (record["source"], record["problem_id"], int(record["sample"]))


def read_chains(path: str | Path, skip_damaged: bool = False) -> tuple[list[dict[str, Any]], int]:
    """The records of a chain or step file (the last one of each key) and how many lines were left out.

    A last line cut short by a killed writer (no newline at its end, whatever byte it was cut
    at) is left out and counted. Any other unreadable line (bad UTF-8, bad JSON, a field
    missing or of the wrong type) raises `DamagedLedger` naming the file, the line and what is
    wrong: a record is never dropped silently. With `skip_damaged`, such lines are left out
    instead, each named in a warning, and counted with the cut line.
    """
    records, _, cut, damaged = _read(path, skip_damaged)
    return records, int(cut is not None) + len(damaged)


class DamagedLedger(BadLine):
    """A chain or step file holds an unreadable line that is not a cut last line."""


# the fields every chain (or step) record must have, and their types
_FIELDS = {"source": str, "problem_id": str, "task": str, "sample": int}
_CHAIN_FIELDS = {**_FIELDS, "messages": list, "outcome": str, "n_prompt": int, "calls": list}
_STEP_FIELDS = {**_FIELDS, "verdict": str, "text": str, "turn": int, "step": int}


def check_record(record: Any) -> dict[str, Any]:
    """`record` once checked to be a chain or step record of this project; ValueError naming what is wrong otherwise."""
    check_fields(record, _STEP_FIELDS if isinstance(record, dict) and "verdict" in record else _CHAIN_FIELDS)
    if record["sample"] < 0:
        raise ValueError(f"field 'sample' must be >= 0, not {record['sample']}")
    check_messages(record.get("messages", []), "chain")
    return record


def _read(
    path: str | Path, skip_damaged: bool = False
) -> tuple[list[dict[str, Any]], int, bytes | None, list[bytes]]:
    """(last record of each key, readable lines, the cut last line if any, damaged lines skipped) of a chain file."""
    path = Path(path)
    if not path.is_file():
        return [], 0, None, []
    records: dict[Key, dict[str, Any]] = {}
    readable, damaged = 0, []
    lines = path.read_bytes().split(b"\n")
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = read_record(raw, check_record)
        except (RecursionError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            if n == len(lines):  # the last line, with no newline after it: a writer killed mid-line
                return list(records.values()), readable, raw, damaged
            what = f"{path}, line {n}: unreadable record: {fault_of(e)}"
            if not skip_damaged:
                raise DamagedLedger(f"{what}; repair or remove that line (a cut last line is handled by itself)") from None
            log.warning("%s; left out (skip_damaged)", what)
            damaged.append(raw)
            continue
        records[key_of(record)] = record
        readable += 1
    return list(records.values()), readable, None, damaged


def _ends_with_newline(path: Path) -> bool:
    """Whether the next record appended to `path` starts a line of its own (a kill can cut just the newline)."""
    if not path.is_file() or path.stat().st_size == 0:
        return True
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


SIDE_FILES = (".cut", ".damaged")  # where lines a ledger could not use are kept: `<file>.cut`, `<file>.damaged`


def _set_aside(path: Path, lines: Sequence[bytes], suffix: str) -> None:
    """Keep unusable lines for inspection in `<file><suffix>` before the file is rewritten without them."""
    if not lines:
        return
    side = path.with_name(path.name + suffix)
    with open(side, "ab") as f:
        f.writelines(raw + b"\n" for raw in lines)
    why = ("the last line was cut short (a run was interrupted mid-write)" if suffix == ".cut"
           else f"{len(lines)} damaged line{'s' * (len(lines) > 1)}")  # fmt: skip
    log.warning("%s: %s; kept in %s, their chains are redone", path, why, side)


def set_aside_counts(folder: str | Path) -> dict[str, int]:
    """{side file name: lines} of every ledger side file under `folder` (cut or damaged lines kept for inspection)."""
    folder = Path(folder)
    return {str(f.relative_to(folder)): len(f.read_bytes().splitlines())
            for suffix in SIDE_FILES for f in sorted(folder.rglob(f"*.jsonl{suffix}"))}  # fmt: skip


def _write_atomic(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(jsonl_line(r))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fingerprint(backend: ChatBackend, config: AgentConfig) -> dict[str, Any]:
    """What decides the chains of a source: the backend kind, the model and the agent's settings."""
    return {"backend": type(backend).__name__, "model": backend.model_id, "agent": json.loads(json.dumps(asdict(config)))}


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def generate(
    backend: ChatBackend,
    problems: Sequence[Problem],
    path: str | Path,
    k: int = 4,
    config: AgentConfig | None = None,
    tasks: Mapping[str, Task] | None = None,
    source: str = "teacher",
    chunk_size: int = 64,
    overwrite: bool = False,
    progress: bool = True,
    skip_damaged: bool = False,
) -> list[dict[str, Any]]:
    """Solve each problem k times with `backend`, appending each chain to `path` as it ends.

    Resumes from what `path` already holds (see the module docstring); with `skip_damaged`, a
    damaged line inside the file is kept in `<file>.damaged` and its chain redone, instead of
    stopping with `DamagedLedger`. Returns the records
    of this source for these problems and samples 0..k-1, in problem then sample order.
    `chunk_size` chains advance together: one batched call per step on a local backend,
    up to the backend's concurrency in flight on an endpoint.
    """
    from fclib.tasks import TASKS

    if k < 1 or chunk_size < 1:
        raise ValueError("k and chunk_size must be at least 1")
    if not problems:
        raise ValueError("no problems to generate chains for")
    config = config or AgentConfig()
    tasks = dict(tasks or TASKS)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _claim(path, source, fingerprint(backend, config), overwrite)

    records, readable, cut, damaged = _read(path, skip_damaged)
    kept = [r for r in records if not (r["source"] == source and r["outcome"] == "error")]
    _set_aside(path, [cut] if cut is not None else [], ".cut")
    _set_aside(path, damaged, ".damaged")
    if cut is not None or damaged or len(kept) != readable or not _ends_with_newline(path):
        _write_atomic(path, kept)  # drop a cut line and duplicates; failed chains are redone
    done = {key_of(r) for r in kept}
    todo = [(p, [s for s in range(k) if (source, p.id, s) not in done]) for p in problems]
    todo = [(p, missing) for p, missing in todo if missing]
    total = len(problems) * k
    counts = {"correct": 0, "error": 0}
    new: list[dict[str, Any]] = []
    bar = progress_bar(total=total, initial=total - sum(len(m) for _, m in todo), desc=f"chains ({source})", unit="chain",
                       disable=not progress, smoothing=0.1)  # fmt: skip

    with open(path, "a", encoding="utf-8") as out:

        def save(chain: Chain) -> None:
            new.append(chain.to_dict())
            out.write(jsonl_line(new[-1]))
            out.flush()
            counts["correct"] += chain.outcome == "correct"
            counts["error"] += chain.outcome == "error"
            bar.update(1)
            bar.set_postfix(counts, refresh=False)

        for group in _chunks(todo, chunk_size):
            by_samples: dict[tuple[int, ...], list[Problem]] = {}
            for p, missing in group:
                by_samples.setdefault(tuple(missing), []).append(p)
            for samples, group_problems in by_samples.items():
                run_chains(backend, tasks, group_problems, config, samples=list(samples), progress=False,
                           source=source, on_done=save)  # fmt: skip
            os.fsync(out.fileno())
    bar.close()

    wanted = {(source, p.id, s): i * k + s for i, p in enumerate(problems) for s in range(k)}
    return sorted((r for r in kept + new if key_of(r) in wanted), key=lambda r: wanted[key_of(r)])


def add_records(path: str | Path, records: Sequence[Mapping[str, Any]], source: str, settings: Mapping[str, Any]) -> int:
    """Store chains made elsewhere (the reference chains) as source `source`; returns how many were new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _claim(path, source, dict(settings), overwrite=False)
    existing, _ = read_chains(path)
    have = {key_of(r) for r in existing if r["outcome"] != "error"}
    new = [{**r, "source": source} for r in records if (source, r["problem_id"], int(r["sample"])) not in have]
    if new:
        by_key = {key_of(r): r for r in existing}
        by_key.update({key_of(r): r for r in new})
        _write_atomic(path, by_key.values())
    return len(new)


STEP_VERDICTS = ("same", "same_function", "other_function", "wrong_answer", "invalid_call", "parse_error", "error")


def step_verdict(reply_text: str, reference: Mapping[str, Any], turn: int, toolset: Any) -> tuple[str, str | None, str]:
    """(verdict, function called, error) of a reply at `turn` of a reference chain.

    `same`: the reference's own text; `same_function`: another valid call of the function the
    reference calls there (another lookup, say); `other_function`: a valid call of another one
    (answering before the facts are in, or looking up after they are); `wrong_answer`: the
    final function with another value than the reference's; `invalid_call`, `parse_error`: no
    usable call. The last four are rejected turns (`fclib.pairs.REJECTED_VERDICTS`). A seventh
    verdict, `error`, is `sample_steps`'s own: the request failed, and the next run asks again.
    """
    from fclib.pairs import same_value
    from fclib.protocol import CallSyntaxError, parse_call

    ref_text = reference["messages"][turn]["content"]
    if reply_text.strip() == ref_text.strip():
        return "same", None, ""
    ref_call = reference["calls"][sum(m["role"] == "assistant" for m in reference["messages"][reference["n_prompt"]:turn])]
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
    import zlib

    from fclib.llm import GenerationSettings, Reply
    from fclib.pairs import REJECTED_VERDICTS
    from fclib.tasks import TASKS

    if samples < 1 or chunk_size < 1:
        raise ValueError("samples and chunk_size must be at least 1")
    config = config or AgentConfig()
    if config.native_tools:
        raise ValueError("step sampling speaks the text protocol; set native_tools=False")
    by_id = {p.id: p for p in problems}
    references = [r for r in references if r["problem_id"] in by_id]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _claim(path, source, {**fingerprint(backend, config), "samples": samples}, overwrite)
    records, readable, cut, damaged = _read(path, skip_damaged)
    kept = [r for r in records if not (r["source"] == source and r["verdict"] == "error")]
    _set_aside(path, [cut] if cut is not None else [], ".cut")
    _set_aside(path, damaged, ".damaged")
    if cut is not None or damaged or len(kept) != readable or not _ends_with_newline(path):
        _write_atomic(path, kept)  # drop a cut line and duplicates; failed requests are asked again
    records = kept
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
    bar = progress_bar(total=len(jobs), initial=len(jobs) - len(todo), desc=f"steps ({source})", unit="reply",
                       disable=not progress)
    with open(path, "a", encoding="utf-8") as out:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            settings = GenerationSettings(
                max_tokens=config.max_tokens_per_turn, temperature=config.temperature, top_p=config.top_p,
                seed=config.seed, stop=config.stop,
                seeds=tuple(zlib.crc32(f"{config.seed}:step:{ref['problem_id']}:{turn}:{k}".encode()) & 0x7FFFFFFF
                            for ref, turn, _, k in chunk),
            )  # fmt: skip
            try:
                replies = backend.chat([[dict(m) for m in ref["messages"][:turn]] for ref, turn, _, _ in chunk], settings)
            except Exception as e:  # the backend is outside our control: every reply of the chunk failed
                log.exception("step sampling: a backend call failed for %d replies", len(chunk))
                replies = [Reply("", 0, 0, "error", error=f"{type(e).__name__}: {e}"[:500]) for _ in chunk]
            for (ref, turn, step, k), reply in zip(chunk, replies):
                base = {"source": source, "problem_id": ref["problem_id"], "task": ref["task"], "sample": k,
                        "reference_source": ref["source"], "reference_sample": ref["sample"], "turn": turn, "step": step,
                        "model": backend.model_id}  # fmt: skip
                usage = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens}
                if reply.error is not None:
                    new.append({**base, "text": reply.text, "verdict": "error", "function": None, "error": reply.error,
                                "usage": usage, "retries": reply.retries})  # fmt: skip
                    counts["failed"] += 1
                else:
                    problem = by_id[ref["problem_id"]]
                    verdict, name, error = step_verdict(reply.text, ref, turn, TASKS[ref["task"]].toolset(problem))
                    new.append({**base, "text": reply.text, "verdict": verdict, "function": name, "error": error, "usage": usage})
                    counts["rejected"] += verdict in REJECTED_VERDICTS
                out.write(jsonl_line(new[-1]))
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(chunk))
            bar.set_postfix(counts, refresh=False)
    bar.close()
    if counts["failed"]:
        log.warning("step sampling: %d of %d requests failed (verdict 'error' in %s); they are asked again on the next run",
                    counts["failed"], len(todo), path)  # fmt: skip
    return sorted((r for r in records + new if key_of(r) in wanted), key=lambda r: wanted[key_of(r)])


def _chunks(todo: list[tuple[Problem, list[int]]], size: int) -> Iterable[list[tuple[Problem, list[int]]]]:
    """Groups of problems holding about `size` chains each."""
    group, n = [], 0
    for item in todo:
        group.append(item)
        n += len(item[1])
        if n >= size:
            yield group
            group, n = [], 0
    if group:
        yield group


def _claim(path: Path, source: str, settings: dict[str, Any], overwrite: bool) -> None:
    """Record the settings of `source` beside the chain file; refuse a silent change of them."""
    meta_path = path.with_name(path.stem + ".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"sources": {}}
    old = meta["sources"].get(source)
    if old is not None and old != settings:
        changes = _differences(old, settings)
        if not overwrite:
            raise ValueError(
                f"{path} already holds chains of source {source!r} made with other settings "
                f"({'; '.join(changes)}). Use another run_name, another source label, or overwrite=True "
                f"(which moves the old chains of {source!r} to a backup file)."
            )
        records, _ = read_chains(path)
        backup = path.with_name(f"{path.stem}.{source}.replaced-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        _write_atomic(backup, [r for r in records if r["source"] == source])
        _write_atomic(path, [r for r in records if r["source"] != source])
        log.warning("moved the old chains of %r to %s (%s)", source, backup, "; ".join(changes))
    meta["sources"][source] = settings
    tmp = meta_path.with_name(meta_path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)


def summarize(records: Sequence[Mapping[str, Any]], prices: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Counts a reader wants after generation.

    - `outcomes`: {source: {task: {outcome: chains}}}
    - `yield`: {source: {task: {problems, with_correct, with_incorrect, with_both, share_with_both}}},
      where incorrect means a finished chain that is not correct (errors are not the model's);
      problems with both are the ones that give preference pairs.
    - `tokens`: {source: {prompt_tokens, completion_tokens, chains, retries, latency_s}}, with
      `cost` when `prices` gives USD per million tokens as {"prompt": .., "completion": ..}.
    """
    from fclib.agent import OUTCOMES

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
        t = tokens.setdefault(src, {"chains": 0, "prompt_tokens": 0, "completion_tokens": 0, "retries": 0, "latency_s": 0.0})
        t["chains"] += 1
        t["prompt_tokens"] += r["usage"]["prompt_tokens"]
        t["completion_tokens"] += r["usage"]["completion_tokens"]
        t["retries"] += r.get("retries", 0)
        t["latency_s"] += r.get("latency_s", 0.0)
    yields: dict[str, dict[str, dict[str, float]]] = {}
    for (src, task, _), kinds in per_problem.items():
        y = yields.setdefault(src, {}).setdefault(task, {"problems": 0, "with_correct": 0, "with_incorrect": 0, "with_both": 0})
        y["problems"] += 1
        y["with_correct"] += "correct" in kinds
        y["with_incorrect"] += "incorrect" in kinds
        y["with_both"] += kinds == {"correct", "incorrect"}
    for by_task in yields.values():
        for y in by_task.values():
            y["share_with_both"] = y["with_both"] / y["problems"]
    if prices:
        for t in tokens.values():
            t["cost"] = (t["prompt_tokens"] * prices.get("prompt", 0) + t["completion_tokens"] * prices.get("completion", 0)) / 1e6
    return {"outcomes": outcomes, "yield": yields, "tokens": tokens}
