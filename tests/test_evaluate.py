"""Evaluation metrics on hand-made results with known answers."""

from __future__ import annotations

import json
import math

import pytest

from fclib.evaluate import EvalSettings, call_error, metrics, paired_test, pass_at_k, significance_sentence, wilson
from fclib.problems import Problem


def rec(label, pid, outcome, task="fol", sample=0, calls=None, answer_correct=None, final_answer=None):
    return {
        "source": label,
        "problem_id": pid,
        "task": task,
        "sample": sample,
        "outcome": outcome,
        "calls": calls or [],
        "answer_correct": outcome == "correct" if answer_correct is None else answer_correct,
        "final_answer": final_answer,
    }


def test_wilson_interval_matches_the_formula():
    lo, hi = wilson(8, 10)
    z = 1.959963984540054
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / (1 + z * z / 10)
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-9)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)
    for n in range(1, 60):  # the bounds never cross the estimate, so error bars are never negative
        assert all(lo <= k / n <= hi for k in (0, n // 2, n) for lo, hi in [wilson(k, n)])


def test_mcnemar_on_a_known_table():
    # 20 problems: both solve 5, base only 3, dpo only 10, neither 2.
    outcomes = [("correct", "correct")] * 5 + [("correct", "max_steps")] * 3 + [("wrong_answer", "correct")] * 10
    outcomes += [("invalid_call", "max_steps")] * 2
    base = [rec("base", f"p{i}", a) for i, (a, _) in enumerate(outcomes)]
    dpo = [rec("dpo", f"p{i}", b) for i, (_, b) in enumerate(outcomes)]
    p = paired_test(base, dpo)
    assert p["table"] == {"both": 5, "base_only": 3, "other_only": 10, "neither": 2}
    assert p["difference"] == pytest.approx(7 / 20)
    assert p["p_value"] == pytest.approx(2 * (1 + 13 + 78 + 286) / 2**13)  # exact binomial, n=13, k<=3
    assert not p["significant"] and "not significant" in significance_sentence("fol", {"models": ["base", "dpo"], **p})
    lo, hi = p["ci95"]
    assert lo < 7 / 20 < hi and -1 <= lo and hi <= 1
    same = paired_test(base, base)
    assert same["difference"] == 0 and same["p_value"] == 1.0


def test_valid_call_rates_get_a_paired_sign_test():
    ok, bad = {"kind": "ok"}, {"kind": "invalid_call", "error": "x"}
    # 9 problems: dpo's share of valid calls higher on 7, lower on 1, equal on 1; p0 base made no call (left out)
    base = [rec("base", "p0", "max_steps", calls=[])]
    base += [rec("base", f"p{i}", "max_steps", calls=[ok, bad]) for i in range(1, 8)]
    base += [rec("base", "p8", "max_steps", calls=[ok]), rec("base", "p9", "max_steps", calls=[ok, ok])]
    dpo = [rec("dpo", "p0", "correct", calls=[ok])]
    dpo += [rec("dpo", f"p{i}", "correct", calls=[ok, ok, ok]) for i in range(1, 8)]
    dpo += [rec("dpo", "p8", "max_steps", calls=[bad]), rec("dpo", "p9", "correct", calls=[ok])]
    v = paired_test(base, dpo)["valid_calls"]
    assert (v["n"], v["higher"], v["lower"]) == (9, 7, 1)
    assert v["base_rate"] == pytest.approx(10 / 17) and v["other_rate"] == pytest.approx(22 / 23)
    assert v["p_value"] == pytest.approx(2 * 9 / 2**8) and not v["significant"]  # P(X <= 1), n = 8
    sentence = significance_sentence("fol", {"models": ["base", "dpo"], **paired_test(base, dpo)})
    assert "Valid calls: dpo 95.7% vs base 58.8% on the 9 problems" in sentence and "sign test p = 0.0703" in sentence


def test_taxonomy_rates_and_sizes():
    calls_ok = [{"kind": "ok"}, {"kind": "ok"}]
    calls_bad = [
        {"kind": "parse_error", "error": "no call found"},
        {"kind": "invalid_call", "error": "unknown function 'look'; the functions are ..."},
        {"kind": "invalid_call", "error": "holds takes 2 argument(s), got 3"},
        {"kind": "invalid_call", "error": "predicate must be one of 'red', 'blue'; got 'x'"},
        {"kind": "function_error", "error": "division by zero"},
    ]
    assert [call_error(c) for c in calls_bad] == [
        "parse failure",
        "unknown function",
        "wrong arguments",
        "bad argument value",
        "function error",
    ]
    records = [
        rec("base", "a", "correct", calls=calls_ok),
        rec("base", "b", "invalid_call", calls=calls_bad),
        rec("base", "c", "wrong_answer", answer_correct=True, calls=calls_ok),
        rec("base", "d", "max_steps", calls=calls_ok),
    ]
    problems = [Problem(pid, "fol", "q", True, {"n": n}) for pid, n in zip("abcd", (2, 2, 5, 5))]
    m = metrics(records, problems)["models"]["base"]["fol"]
    assert (m["accuracy"], m["n"], m["answer_accuracy"]) == (0.25, 4, 0.5)
    assert m["valid_call_rate"] == pytest.approx(7 / 11)  # ok and function_error calls are well formed
    assert m["mean_calls"] == pytest.approx(11 / 4) and m["answered"] == 0.5
    assert m["outcomes"]["max_steps"] == 1 and m["call_errors"]["unknown function"] == 1
    assert m["by_size"] == {
        "2": {"accuracy": 0.5, "n": 2, "ci95": list(wilson(1, 2))},
        "5": {"accuracy": 0.0, "n": 2, "ci95": list(wilson(0, 2))},
    }


def test_fol_accuracy_by_nmax_as_the_paper_reports_it(tmp_path):
    from fclib.evaluate import write_report

    problems = [Problem(f"p{i}", "fol", "q", True, {"n": 3, "nmax": 10 if i < 4 else 20}) for i in range(8)]
    solved = {"base": {"p0"}, "dpo": {"p0", "p1", "p2", "p4"}}
    records = [rec(m, p.id, "correct" if p.id in solved[m] else "max_steps") for m in solved for p in problems]
    m = metrics(records, problems)
    assert m["models"]["dpo"]["fol"]["by_nmax"] == {
        "10": {"accuracy": 0.75, "n": 4, "ci95": list(wilson(3, 4))},
        "20": {"accuracy": 0.25, "n": 4, "ci95": list(wilson(1, 4))},
    }
    within = m["paired"]["fol"]["by_nmax"]  # base vs DPO within each size: the same test on that size's problems
    assert {k: (v["n"], v["table"]["other_only"], v["table"]["base_only"]) for k, v in within.items()} == {
        "10": (4, 2, 0),
        "20": (4, 1, 0),
    }
    assert within["10"]["p_value"] == pytest.approx(0.5) and within["20"]["models"] == ["base", "dpo"]
    text = write_report(tmp_path, m, {"run_name": "t"}).read_text()
    assert "  - fol, nmax 20: dpo 25.0% vs base 0.0% on the same 4 problems" in text
    assert "| model | nmax 10 | nmax 20 | all |" in text
    assert "| dpo | 75.0% (n=4) | 25.0% (n=4) | 50.0% (n=8) |" in text and "| base | 25.0% (n=4) | 0.0% (n=4) |" in text
    from fclib.evaluate import EvalSettings

    limited = EvalSettings(eval_limit=2).problems(problems)  # each size keeps its first two
    assert [p.id for p in limited] == ["p0", "p1", "p4", "p5"] and EvalSettings().problems(problems) == problems
    one_size = [Problem(p.id, "fol", "q", True, {"n": 3, "nmax": 10}) for p in problems]
    assert "by_nmax" not in metrics(records, one_size)["models"]["dpo"]["fol"]  # one size: the table is the total
    assert "by_nmax" not in metrics(records, one_size)["paired"]["fol"]


def test_faithful_chains_are_counted_apart_from_verified_ones(tmp_path):
    from fclib.evaluate import write_report

    def call(name, arguments, result):
        return {"kind": "ok", "name": name, "arguments": arguments, "result": result}

    looked_up = call("truth_values", {"predicate": "red"}, [True, False, False])
    copied = [looked_up, call("exists", {"values": [True, False, False]}, True), call("answer", {"value": True}, True)]
    miscopied = [looked_up, call("exists", {"values": [True, False]}, True), call("answer", {"value": True}, True)]
    records = [rec("dpo", "p0", "correct", calls=copied), rec("dpo", "p1", "correct", calls=miscopied)]
    records += [rec("dpo", "p2", "wrong_answer", calls=copied), rec("dpo", "g0", "correct", task="gsm8k")]
    m = metrics(records)
    assert m["models"]["dpo"]["fol"]["faithful"] == {"accuracy": 1 / 3, "n": 3, "ci95": list(wilson(1, 3))}
    assert m["models"]["dpo"]["fol"]["correct"] == 2 and "faithful" not in m["models"]["dpo"]["gsm8k"]
    assert "dpo 1 of its 2 verified." in write_report(tmp_path, m, {"run_name": "t"}).read_text()


def test_the_faithful_script_counts_finished_runs(tmp_path, capsys):
    import sys

    from fclib.runs import PROJECT_ROOT

    sys.path.insert(0, str(PROJECT_ROOT / "scripts"))
    from faithful import main

    looked_up = {"kind": "ok", "name": "truth_values", "arguments": {"predicate": "red"}, "result": [True, False]}
    answer = {"kind": "ok", "name": "answer", "arguments": {"value": True}, "result": True}
    for run, values in (("s0", [True, False]), ("s1", [True])):  # s1 drops a value when it passes the list on
        quantifier = {"kind": "ok", "name": "exists", "arguments": {"values": values}, "result": True}
        records = [rec("dpo", "fol-test-n10-d1-00000", "correct", calls=[looked_up, quantifier, answer])]
        records += [rec("dpo", "gsm8k-test-00001", "correct", task="gsm8k")]
        (tmp_path / run / "eval").mkdir(parents=True)
        (tmp_path / run / "eval" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "s0 dpo n10: verified 1/1, faithful 1/1" in out and "s1 dpo n10: verified 1/1, faithful 0/1" in out
    assert f"all of {tmp_path.name}, dpo all: verified 2/2, faithful 1/2" in out and "gsm8k" not in out


def test_pass_at_k_and_majority_vote():
    assert pass_at_k(4, 0, 4) == 0 and pass_at_k(4, 1, 4) == 1 and pass_at_k(5, 1, 2) == pytest.approx(0.4)
    records = [
        rec("base", "a", o, sample=s, final_answer=v, answer_correct=ok, task="gsm8k")
        for s, (o, v, ok) in enumerate([("correct", 3, True), ("wrong_answer", 4, False), ("correct", 3, True)])
    ]
    records += [
        rec("base", "b", "wrong_answer", sample=s, final_answer=9, answer_correct=False, task="gsm8k") for s in range(3)
    ]
    m = metrics(records)["models"]["base"]["gsm8k"]
    assert m["samples_per_problem"] == 3 and m["pass@3"] == 0.5 and m["majority_vote_answer_accuracy"] == 0.5


def test_report_reads_on_its_own(tmp_path):
    base = [rec("base", f"p{i}", "correct" if i < 3 else "max_steps") for i in range(10)]
    dpo = [rec("dpo", f"p{i}", "correct" if i < 6 else "max_steps") for i in range(10)]
    from fclib.evaluate import write_report

    path = write_report(tmp_path, metrics(base + dpo), {"run_name": "t", "seed": 0}, ["figures/eval_accuracy.png"])
    text = path.read_text()
    assert "| dpo | fol | 60.0% (" in text and "| base | fol | 30.0% (" in text
    assert "exact McNemar p = 0.25" in text and "not significant" in text
    assert "![eval_accuracy](figures/eval_accuracy.png)" in text and "run_name: t" in text


def test_the_error_taxonomy_reads_codes_not_messages():
    """Each failed call carries a code; the taxonomy is the one the messages gave; rewording them changes nothing."""
    from fclib.agent import AgentConfig, run_chains
    from fclib.backends.scripted import ScriptedBackend
    from fclib.evaluate import _code_of_old_record
    from fclib.tasks import TASKS, fol, gsm8k

    bad = [
        "f(",
        "nosuch(a=1)",
        "add(1, 2, 3)",
        "add(a=1, c=2)",
        "add(a=1)",
        "add(a=1, b='x')",
        "divide(a=1, b=0)",
        "add(a=1e300, b=1e300)",
        "logical_and(a=[True], b=[True, False])",
        "holds(predicate=3, individual='x')",
    ]
    problems = [fol.generate(1, seed=3, nmax=4)[0], gsm8k.Problem("g", "gsm8k", "q", 1.0, {"solution": "#### 1"})]
    backend = ScriptedBackend({p.question: bad for p in problems})
    chains = run_chains(backend, TASKS, problems, AgentConfig(max_steps=len(bad), max_retries=len(bad)), progress=False)
    calls = [c for chain in chains for c in chain.to_dict()["calls"] if c["kind"] != "ok"]
    assert len({c["code"] for c in calls}) == 5  # every code occurs
    for c in calls:
        assert c["code"] == _code_of_old_record(c), c  # the same class the message matching gave
        assert call_error({**c, "error": "reworded"}) == call_error(c)


def test_evaluation_sets_only_the_agent_limits_it_is_given():
    from fclib.agent import AgentConfig

    assert EvalSettings().agent_limits() == {}
    given = EvalSettings(eval_max_tokens_per_turn=100, eval_max_chain_tokens=4096).agent_limits()
    config = AgentConfig.from_params({"max_tokens_per_turn": 40, "max_chain_tokens": 2048}, **given)
    assert (config.max_tokens_per_turn, config.max_chain_tokens) == (100, 4096)
    only = EvalSettings(eval_max_chain_tokens=3000).agent_limits()
    assert AgentConfig.from_params({"max_tokens_per_turn": 40}, **only).max_tokens_per_turn == 40
