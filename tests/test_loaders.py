"""Every loader of the project names the file and line of bad input, whatever is wrong with it.

Loaders: problems (`read_problems`), chains and steps (`read_chains`, and the resume in
`generate`), pairs (`read_pairs`, `load_pairs`) and profiles (`load_profile`). Each gets a good
file whose second line is then broken in one way: bad JSON, bad UTF-8, not an object, a field
missing, a field of the wrong type.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fclib import profiles as fclib_profiles
from fclib.agent import AgentConfig
from fclib.backends.scripted import ScriptedBackend
from fclib.chains import DamagedLedger, generate, read_chains
from fclib.evaluate import run_failures, write_report
from fclib.pairs import load_pairs, read_pairs
from fclib.problems import read_problems, write_problems
from fclib.runs import BadLine
from fclib.tasks import fol, reference_script
from tests.helpers import scripted_chain

PROBLEMS = fol.generate(3, seed=5, nmax=4, split="train")


def _chain_lines() -> list[dict]:
    return [scripted_chain(p, reference_script(p), 0) for p in PROBLEMS]


def _step_lines() -> list[dict]:
    return [
        {
            "source": "teacher",
            "problem_id": p.id,
            "task": "fol",
            "sample": 0,
            "reference_source": "reference",
            "reference_sample": 0,
            "turn": 3,
            "step": 0,
            "model": "m",
            "text": "answer(value=True)",
            "verdict": "other_function",
            "function": "answer",
            "error": "",
            "usage": {},
        }
        for p in PROBLEMS
    ]


def _pair_lines() -> list[dict]:
    return [
        {
            "problem_id": p.id,
            "prompt": [{"role": "user", "content": p.question}],
            "chosen": [{"role": "assistant", "content": "answer(value=True)"}],
            "rejected": [{"role": "assistant", "content": "look()"}],
        }
        for p in PROBLEMS
    ]


RECORDS = {
    "problems": lambda: [p.to_dict() for p in PROBLEMS],
    "chains": _chain_lines,
    "steps": _step_lines,
    "pairs": _pair_lines,
}
LOADERS = {
    "problems": read_problems,
    "chains": read_chains,
    "steps": read_chains,
    "pairs": read_pairs,
}
# (what is done to line 2, words the message must hold)
FAULTS = {
    "bad JSON": (lambda rec, line: line[:-5], "not valid JSON"),
    "bad UTF-8": (lambda rec, line: line[:20] + b"\xff\xfe" + line[20:], "not valid UTF-8"),
    "not an object": (lambda rec, line: b"[1, 2, 3]", "JSON object, not list"),
    "field missing": (lambda rec, line: _dump({k: v for k, v in rec.items() if k != _key_field(rec)}), "missing"),
    "field mistyped": (lambda rec, line: _dump({**rec, _key_field(rec): 7}), "must be"),
}


def _key_field(record: dict) -> str:
    """A field every record of its kind must have, a string."""
    return "problem_id" if "problem_id" in record else "id"


def _dump(record: dict) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode()


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("kind", RECORDS)
def test_a_bad_line_is_named_with_its_file_and_line(tmp_path, kind, fault):
    records = RECORDS[kind]()
    lines = [_dump(r) for r in records]
    change, words = FAULTS[fault]
    lines[1] = change(records[1], lines[1])
    path = tmp_path / f"{kind}.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError) as refused:
        LOADERS[kind](path)
    message = str(refused.value)
    assert f"{path}, line 2:" in message and words in message, message
    assert isinstance(refused.value, BadLine)


def test_the_good_files_load(tmp_path):
    for kind, records in RECORDS.items():
        path = tmp_path / f"{kind}.jsonl"
        path.write_bytes(b"\n".join(_dump(r) for r in records()) + b"\n")
        loaded = LOADERS[kind](path)
        assert len(loaded[0] if kind in ("chains", "steps") else loaded) == len(PROBLEMS)


def test_load_pairs_reads_the_checked_jsonl(tmp_path):
    rows = _pair_lines()
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_pairs(tmp_path)["train"].num_rows == len(rows)
    (tmp_path / "validation.jsonl").write_text(json.dumps({**rows[0], "chosen": []}) + "\n")
    with pytest.raises(BadLine, match=r"validation.jsonl, line 1: field 'chosen' must be a non-empty list"):
        load_pairs(tmp_path)


# --- ledgers: a damaged line stops, or with skip_damaged is left out, kept aside and counted ---


def test_a_damaged_chain_line_stops_the_resume_or_is_set_aside_and_redone(tmp_path):
    path = tmp_path / "chains.jsonl"
    backend = ScriptedBackend({p.question: reference_script(p) for p in PROBLEMS}, model_id="t")
    config = AgentConfig(max_steps=8)
    first = generate(backend, PROBLEMS, path, k=1, config=config, progress=False)
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1][:30] + b"\xff" + lines[1][31:]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DamagedLedger, match=r"chains.jsonl, line 2: unreadable record: not valid UTF-8"):
        read_chains(path)
    with pytest.raises(DamagedLedger, match="line 2"):
        generate(backend, PROBLEMS, path, k=1, config=config, progress=False)
    records, left_out = read_chains(path, skip_damaged=True)
    assert left_out == 1 and len(records) == len(PROBLEMS) - 1

    again = generate(backend, PROBLEMS, path, k=1, config=config, progress=False, skip_damaged=True)
    assert [r["problem_id"] for r in again] == [r["problem_id"] for r in first]
    side = tmp_path / "chains.jsonl.damaged"
    assert side.read_bytes() == lines[1] + b"\n"  # kept byte for byte, for inspection
    stored, left_out = read_chains(path)
    assert left_out == 0 and sorted(stored, key=lambda r: r["problem_id"]) == sorted(
        again, key=lambda r: r["problem_id"]
    )


def test_the_report_counts_what_failed_or_was_left_out(tmp_path):
    (tmp_path / "chains").mkdir()
    (tmp_path / "chains" / "summary.json").write_text(
        json.dumps(
            {
                "outcomes": {"teacher": {"fol": {"correct": 3, "error": 2}}, "reference": {"fol": {"error": 5}}},
                "step_replies_failed": 4,
            }
        )
    )
    (tmp_path / "chains" / "chains.jsonl.cut").write_text('{"a\n')
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "stats.json").write_text(json.dumps({"ledger_lines_left_out": 1}))
    failures = run_failures(tmp_path, left_out_here=3)
    assert list(failures.values()) == [2, 4, 1, 3, 1]
    m = {"models": {}, "paired": {}}
    text = write_report(tmp_path, m, {"run_name": "x"}, failures=failures).read_text()
    assert (
        "## What failed or was left out" in text
        and "teacher step requests that failed (asked again on the next run): 4" in text
    )
    assert "lines kept aside in chains/chains.jsonl.cut: 1" in text
    clean = write_report(tmp_path, m, {}, failures={k: 0 for k in failures}).read_text()
    assert "Nothing: every request was answered" in clean


def test_problem_files_of_any_encoding_fault_name_the_line(tmp_path):
    path = write_problems(tmp_path / "p.jsonl", PROBLEMS)
    path.write_bytes(path.read_bytes() + b'{"id": "x", "task": "fol", "question": "\xe2\x88", "answer": true}\n')
    with pytest.raises(BadLine, match=rf"p.jsonl, line {len(PROBLEMS) + 1}: not valid UTF-8"):
        read_problems(path)


# --- profiles ---


@pytest.fixture
def profiles(tmp_path, monkeypatch):
    folder = tmp_path / "profiles"
    shutil.copytree(fclib_profiles.PROFILES, folder)
    monkeypatch.setattr(fclib_profiles, "PROFILES", folder)
    return folder


def _edit(folder: Path, old: str, new: str) -> int:
    """Replace the first line of cpu.yaml starting with `old` by `new`; returns its line number."""
    lines = (folder / "cpu.yaml").read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if line.startswith(old))
    lines[n] = new
    (folder / "cpu.yaml").write_text("\n".join(lines) + "\n")
    return n + 1


@pytest.mark.parametrize(
    "old, new, words",
    [
        ("k:", "k: two", "parameter k must be int, got 'two'"),
        ("k:", "k: null", "parameter k must be int, got null"),
        ("temperature:", "temperature: hot", "parameter temperature must be a number"),
        ("reference_chains:", "reference_chains: 1", "parameter reference_chains must be bool"),
        ("k:", "kk: 2", "unknown parameter 'kk' (did you mean 'k'?)"),
        ("k:", "k: [1, 2", "not valid YAML"),
        ("k:", "k: 2\nk: 3", "parameter 'k' is set twice"),
    ],
)
def test_a_bad_profile_line_is_named(profiles, old, new, words):
    n = _edit(profiles, old, new)
    with pytest.raises(SystemExit) as refused:
        fclib_profiles.load_profile("cpu")
    message = str(refused.value)
    assert words in message, message
    assert f"cpu.yaml, line {n}" in message or f"cpu.yaml, line {n + 1}" in message, message


def test_a_profile_with_bad_utf8_or_a_missing_parameter_is_named(profiles):
    path = profiles / "cpu.yaml"
    original = path.read_bytes()
    path.write_bytes(original.replace(b"# Problems", b"# Probl\xe8mes", 1))
    line = original[: original.index(b"# Problems")].count(b"\n") + 1
    with pytest.raises(SystemExit, match=rf"cpu.yaml, line {line}: not valid UTF-8"):
        fclib_profiles.load_profile("cpu")
    path.write_bytes(b"\n".join(x for x in original.split(b"\n") if not x.startswith(b"max_length:")))
    with pytest.raises(SystemExit, match=r"cpu.yaml: parameters missing: max_length"):
        fclib_profiles.load_profile("cpu")


def test_every_shipped_profile_passes_the_checks():
    for path in sorted(fclib_profiles.PROFILES.glob("*.yaml")):
        overrides = {"teacher_url": "https://api.example.org/v1", "teacher": "big"} if path.stem == "paper" else {}
        assert fclib_profiles.load_profile(path.stem, overrides)["run_name"]
