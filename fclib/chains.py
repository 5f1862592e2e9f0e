"""Chain records and the resumable store every stage reads and writes.

    records = generate(backend, problems, run_folder / "chains" / "chains.jsonl", k=4, config=config)

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fclib.agent import AgentConfig, Chain, Task, run_chains
from fclib.backends import ChatBackend
from fclib.problems import Problem
from fclib.runs import (
    BadLine,
    check_fields,
    check_messages,
    differences,
    fault_of,
    jsonl_line,
    jsonl_lines,
    progress_bar,
    read_record,
)
from fclib.tasks import TASKS

log = logging.getLogger(__name__)
Key = tuple[str, str, int]


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


def same_value(a: Any, b: Any) -> bool:
    """Equal answers: booleans by identity, numbers within a relative 1e-6, the rest by ==."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))
    return a == b


def verified(record: Mapping[str, Any]) -> bool:
    """A correct chain whose final answer is what its own calls computed.

    The task's checker already compared the answer with the gold one (and, for FOL, that the
    chain looked up the facts); here the answer must also be the result of an earlier
    successful call of the same chain, not a number or truth value typed from nowhere.
    """
    if record["outcome"] != "correct" or not record["calls"]:
        return False
    final = record["calls"][-1]
    computed = [c["result"] for c in record["calls"][:-1] if c["kind"] == "ok"]
    return final["kind"] == "ok" and any(same_value(record["final_answer"], v) for v in computed)


def _read(path: str | Path, skip_damaged: bool = False) -> tuple[list[dict[str, Any]], int, bytes | None, list[bytes]]:
    """(last record of each key, readable lines, the cut last line if any, damaged lines skipped) of a chain file."""
    path = Path(path)
    if not path.is_file():
        return [], 0, None, []
    records: dict[Key, dict[str, Any]] = {}
    readable, damaged = 0, []
    lines = jsonl_lines(path.read_bytes())
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
                raise DamagedLedger(
                    f"{what}; repair or remove that line (a cut last line is handled by itself)"
                ) from None
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
    why = (
        "the last line was cut short (a run was interrupted mid-write)"
        if suffix == ".cut"
        else f"{len(lines)} damaged line{'s' * (len(lines) > 1)}"
    )
    log.warning("%s: %s; kept in %s, their chains are redone", path, why, side)


def set_aside_counts(run_folder: str | Path) -> dict[str, int]:
    """{side file name: lines} of every ledger side file of a run (cut or damaged lines kept for inspection)."""
    run_folder = Path(run_folder)
    return {
        str(f.relative_to(run_folder)): sum(bool(line.strip()) for line in jsonl_lines(f.read_bytes()))
        for suffix in SIDE_FILES
        for f in sorted(run_folder.rglob(f"*.jsonl{suffix}"))
    }


def _write_atomic(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(jsonl_line(r))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resume(path: Path, source: str, failed_field: str, skip_damaged: bool = False) -> list[dict[str, Any]]:
    """The records of `path` that a resumed run keeps, the file made ready to append to.

    Records of `source` whose `failed_field` is "error" (a failed request, not a wrong answer)
    are dropped, so they are asked again; a cut last line is kept in `<file>.cut` and, with
    `skip_damaged`, damaged lines in `<file>.damaged`; the file is rewritten without them
    (and without duplicate keys) when anything was dropped or its last newline is missing.
    """
    records, readable, cut, damaged = _read(path, skip_damaged)
    kept = [r for r in records if not (r["source"] == source and r.get(failed_field) == "error")]
    _set_aside(path, [cut] if cut is not None else [], ".cut")
    _set_aside(path, damaged, ".damaged")
    if cut is not None or damaged or len(kept) != readable or not _ends_with_newline(path):
        _write_atomic(path, kept)
    return kept


def fingerprint(backend: ChatBackend, config: AgentConfig) -> dict[str, Any]:
    """What decides the chains of a source: the backend kind, the model and the agent's settings.

    An unconstrained agent's settings leave `grammar` out, as files written before it existed do,
    so that those still resume."""
    agent = json.loads(json.dumps(asdict(config)))
    if not agent.get("grammar"):
        agent.pop("grammar", None)
    return {"backend": type(backend).__name__, "model": backend.model_id, "agent": agent}


def generate(
    backend: ChatBackend,
    problems: Sequence[Problem],
    path: str | Path,
    k: int = 2,
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
    if k < 1 or chunk_size < 1:
        raise ValueError("k and chunk_size must be at least 1")
    if not problems:
        raise ValueError("no problems to generate chains for")
    config = config or AgentConfig()
    tasks = dict(tasks or TASKS)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    claim(path, source, fingerprint(backend, config), overwrite)

    kept = resume(path, source, "outcome", skip_damaged)
    done = {key_of(r) for r in kept}
    todo = [(p, [s for s in range(k) if (source, p.id, s) not in done]) for p in problems]
    todo = [(p, missing) for p, missing in todo if missing]
    total = len(problems) * k
    counts = {"correct": 0, "error": 0}
    new: list[dict[str, Any]] = []
    bar = progress_bar(
        total=total,
        initial=total - sum(len(m) for _, m in todo),
        desc=f"chains ({source})",
        unit="chain",
        disable=not progress,
        smoothing=0.1,
    )

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
                run_chains(
                    backend,
                    tasks,
                    group_problems,
                    config,
                    samples=list(samples),
                    progress=False,
                    source=source,
                    on_done=save,
                )
            os.fsync(out.fileno())
    bar.close()

    wanted = {(source, p.id, s): i * k + s for i, p in enumerate(problems) for s in range(k)}
    return sorted((r for r in kept + new if key_of(r) in wanted), key=lambda r: wanted[key_of(r)])


def add_records(
    path: str | Path, records: Sequence[Mapping[str, Any]], source: str, settings: Mapping[str, Any]
) -> int:
    """Store chains made elsewhere (the reference chains) as source `source`; returns how many were new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    claim(path, source, dict(settings), overwrite=False)
    existing, _ = read_chains(path)
    have = {key_of(r) for r in existing if r["outcome"] != "error"}
    new = [{**r, "source": source} for r in records if (source, r["problem_id"], int(r["sample"])) not in have]
    if new:
        by_key = {key_of(r): r for r in existing}
        by_key.update({key_of(r): r for r in new})
        _write_atomic(path, by_key.values())
    return len(new)


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


def claim(path: Path, source: str, settings: dict[str, Any], overwrite: bool) -> None:
    """Record the settings of `source` beside the chain file; refuse a silent change of them."""
    meta_path = path.with_name(path.stem + ".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"sources": {}}
    old = meta["sources"].get(source)
    if old is not None and old != settings:
        changes = differences(old, settings)
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
