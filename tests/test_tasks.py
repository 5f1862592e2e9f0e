"""The tasks: FOL ground truth cross-checked with sympy, GSM8K parsing and reference coverage."""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sympy import Symbol
from sympy.logic.boolalg import And, Implies, Not, Or, false, true

from fclib.agent import outcome_counts
from fclib.problems import Problem, read_problems, write_problems
from fclib.tasks import fol, gsm8k, reference_script, replay_references


def sympy_truth(problem: Problem) -> bool:
    """An independent solver: ground the formula over the world with sympy's logic module."""
    people, world = problem.meta["individuals"], problem.meta["world"]
    facts = {Symbol(f"{p}_{x}"): (true if x in world[p] else false) for p in world for x in people}

    def ground(f, x=None):
        op = f[0]
        if op == "atom":
            return Symbol(f"{f[1]}_{x}")
        if op == "not":
            return Not(ground(f[1], x))
        if op == "forall":
            return And(*[ground(f[1], i) for i in people])
        if op == "exists":
            return Or(*[ground(f[1], i) for i in people])
        return {"and": And, "or": Or, "implies": Implies}[op](ground(f[1], x), ground(f[2], x))

    value = ground(problem.meta["formula"]).subs(facts)
    assert value in (true, false)
    return bool(value == true)


@pytest.mark.parametrize("nmax, depth", [(10, 1), (20, 1), (6, 2), (4, 3)])
def test_fol_ground_truth_agrees_with_sympy(nmax, depth):
    problems = fol.generate(150, seed=7, nmax=nmax, depth=depth)
    assert all(p.answer == sympy_truth(p) for p in problems)
    assert sum(p.answer for p in problems) == 75  # balanced True/False
    assert all(2 <= p.meta["n"] <= nmax for p in problems)


def test_fol_generation_is_seeded_and_splits_differ():
    a = fol.generate(20, seed=1)
    assert a == fol.generate(20, seed=1)
    assert [p.meta for p in a] != [p.meta for p in fol.generate(20, seed=2)]
    test = fol.generate(20, seed=1, split="test")
    assert not {p.id for p in a} & {p.id for p in test}
    assert not {p.question for p in a} & {p.question for p in test}


def test_fol_question_in_words_and_symbols():
    p = fol.make_problem(
        "x",
        ["ann", "bob"],
        {"red": ["ann"], "round": ["ann", "bob"]},
        ["forall", ["implies", ["atom", "red"], ["atom", "round"]]],
    )
    assert "for every individual x, if x is red then x is round" in p.question
    assert "∀x (red(x) → round(x))" in p.question
    assert p.answer is True


@pytest.mark.parametrize("nmax, depth", [(10, 1), (20, 2)])
def test_fol_reference_chains_replay_to_the_answer(nmax, depth):
    problems = fol.generate(60, seed=3, nmax=nmax, depth=depth)
    chains = replay_references(problems)
    assert outcome_counts(chains)["correct"] == 60
    assert all(c.final_answer == p.answer for c, p in zip(chains, problems))


def test_fol_guess_is_not_verified():
    p = fol.generate(1, seed=0)[0]
    guess = [{"kind": "ok", "name": "answer", "arguments": {"value": p.answer}, "result": p.answer}]
    assert fol.answer_check(p, p.answer) and not fol.check(p, p.answer, guess)


def test_fol_reference_chains_are_faithful_and_a_miscopied_list_is_not():
    problems = fol.generate(40, seed=5, nmax=10)
    chains = replay_references(problems)
    calls = [ch.calls for ch in chains]
    assert all(fol.faithful(c) for c in calls)
    # the chain of a quantified problem, with one truth value dropped when it is passed on
    i = next(i for i, c in enumerate(calls) if c[-2]["name"] in ("exists", "for_all") and len(c) >= 3)
    wrong = [dict(c) for c in calls[i]]
    wrong[-2]["arguments"] = {"values": wrong[-2]["arguments"]["values"][:-1]}
    assert not fol.faithful(wrong)
    # an answer no call returned, and a call that failed (not ok) whose result is never used
    assert not fol.faithful([*calls[i][:-1], {"kind": "ok", "name": "answer", "arguments": {"value": 1}, "result": 1}])
    assert fol.faithful([{"kind": "bad_argument", "name": "exists", "arguments": {"values": [1]}}, *calls[i]])


def test_fol_functions_refuse_bad_arguments():
    p = fol.generate(1, seed=0, nmax=4)[0]
    ts = fol.toolset(p)
    from fclib.protocol import parse_call

    def run(text):
        return ts.execute(parse_call(text, set(ts.functions)))

    assert "must be one of" in run("truth_values(predicate='purple')").error
    assert "different lengths" in run("logical_and(a=[True], b=[True, False])").error
    assert "both be lists" in run("logical_or(a=True, b=[True])").error
    assert "only True or False" in run("for_all(values=[1, 0])").error
    assert run("logical_not(a=[True, False])").value == [False, True]


@pytest.mark.parametrize(
    "text, value",
    [
        ("#### 72", 72),
        ("#### 1,234", 1234),
        ("#### $5", 5),
        ("#### -3", -3),
        ("#### 2.5", 2.5),
        ("#### .5", 0.5),
        ("#### $-1,000.25", -1000.25),
    ],
)
def test_gsm8k_gold_answer(text, value):
    assert gsm8k.gold_answer("some work\n" + text) == value


def test_gsm8k_answers_compare_numerically():
    assert gsm8k.answers_match(72, "72.0") and gsm8k.answers_match(0.1 + 0.2, 0.3)
    assert gsm8k.answers_match("$1,000", 1000) and not gsm8k.answers_match(72, 73)
    assert not gsm8k.answers_match(True, 1) and not gsm8k.answers_match("n/a", 1)


def test_gsm8k_expression_calls_never_evaluate():
    calls, value = gsm8k.expression_calls("(3+4)*2-10/5")
    assert value == 12 and [c[0] for c in calls] == ["add", "multiply", "divide", "subtract"]
    for bad in ("__import__('os')", "a+1", "2**10**9", "[1][0]"):
        with pytest.raises(ValueError):
            gsm8k.expression_calls(bad)


def test_gsm8k_reference_coverage_of_the_training_set(gsm8k_dir):
    problems = gsm8k.load("train", gsm8k_dir)
    assert len(problems) == 7473
    chains = replay_references(problems)
    share = outcome_counts(chains)["correct"] / len(problems)
    print(f"GSM8K training problems whose reference chain replays to the gold answer: {share:.1%}")
    assert share >= 0.95


def test_gsm8k_reference_script_reads_like_calls(gsm8k_dir):
    p = gsm8k.load("train", gsm8k_dir)[0]
    assert reference_script(p) == ["divide(a=48, b=2)", "add(a=48, b=24)", "final_answer(value=72)"]


def test_gsm8k_bad_files_name_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{broken\n')
    with pytest.raises(ValueError, match=r"train.jsonl, line 2"):
        gsm8k.load("train", tmp_path)
    with pytest.raises(FileNotFoundError):
        gsm8k.load("test", tmp_path)


def test_gsm8k_ships_with_the_package_and_its_checksums_are_checked(tmp_path):
    assert gsm8k.default_source() == str(gsm8k.SHIPPED)
    assert (gsm8k.SHIPPED / "LICENSE").read_text().startswith("MIT License")
    assert len(gsm8k.load("test")) == 1319 and gsm8k.load("test")[0].answer == 18
    # a copy with one byte changed is refused, naming the file; without SHA256SUMS it loads as a plain folder
    for name in ("test.jsonl.gz", "SHA256SUMS"):
        (tmp_path / name).write_bytes((gsm8k.SHIPPED / name).read_bytes())
    data = gzip.decompress((tmp_path / "test.jsonl.gz").read_bytes()).replace(b"Janet", b"Jenny", 1)
    (tmp_path / "test.jsonl.gz").write_bytes(gzip.compress(data))
    with pytest.raises(ValueError, match=r"test.jsonl.gz: checksum mismatch"):
        gsm8k.load("test", tmp_path)
    (tmp_path / "SHA256SUMS").unlink()
    assert gsm8k.load("test", tmp_path)[0].question.startswith("Jenny")


def test_gsm8k_source_that_is_neither_folder_nor_hub_id_is_refused(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    for bad in (tmp_path / "missing", tmp_path / "file.txt", "./gsm8k"):
        with pytest.raises(FileNotFoundError, match="neither a folder"):
            gsm8k.load("test", bad)


@pytest.mark.slow
def test_the_project_needs_nothing_beside_its_folder(tmp_path):
    """A copy of the project in an empty folder builds every task's problems, with GSM8K from inside it."""
    root = Path(__file__).resolve().parents[1]
    copy = tmp_path / "alone" / "project"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "__pycache__", ".*cache"))
    script = (
        "import fclib, json; from fclib.tasks import build_problems, gsm8k\n"
        "train, test = build_problems(0, 2, 2, 2, 2, nmax=4)\n"
        "print(json.dumps([fclib.__file__, gsm8k.default_source(), len(train), len(test)]))"
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=copy,
        env={**env, "PYTHONPATH": str(copy)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    module, source, n_train, n_test = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(module).is_relative_to(copy) and Path(source).is_relative_to(copy)
    assert (n_train, n_test) == (4, 4)


def test_problems_round_trip_and_bad_lines(tmp_path):
    problems = fol.generate(3, seed=0) + [Problem("g", "gsm8k", "q?", 4.0, {"solution": "#### 4"})]
    path = write_problems(tmp_path / "p" / "train.jsonl", problems)
    assert read_problems(path) == problems
    path.write_text(path.read_text() + json.dumps({"id": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl, line 5: field .task. is missing"):
        read_problems(path)


def test_build_problems_is_deterministic_and_leak_free(gsm8k_dir):
    from fclib.tasks import build_problems

    train, test = build_problems(5, 30, 20, 10, 10, nmax=[4, 10], gsm8k_source=str(gsm8k_dir))
    assert (train, test) == build_problems(5, 30, 20, 10, 10, nmax=[4, 10], gsm8k_source=str(gsm8k_dir))
    assert len(train) == 70 and len(test) == 50
    assert not {p.question for p in train} & {p.question for p in test}
    assert not {p.id for p in train} & {p.id for p in test}
    _, fewer = build_problems(5, 12, 20, 3, 10, nmax=[4, 10], gsm8k_source=str(gsm8k_dir))
    assert fewer == test, "the held-out problems must not depend on how many training problems there are"
    # held-out worlds of other sizes (generalisation): the same training problems, test worlds of those sizes
    train_g, test_g = build_problems(5, 30, 20, 10, 10, nmax=[4, 10], gsm8k_source=str(gsm8k_dir), test_nmax=[12, 20])
    assert train_g == train and [p for p in test_g if p.task == "gsm8k"] == [p for p in test if p.task == "gsm8k"]
    sizes = [p.meta["nmax"] for p in test_g if p.task == "fol"]
    assert sizes == [12] * 20 + [20] * 20 and not {p.question for p in train_g} & {p.question for p in test_g}
    from fclib.settings import SettingsError
    from fclib.tasks import ProblemSettings

    with pytest.raises(SettingsError, match="test_nmax"):
        ProblemSettings(test_nmax=[1])
