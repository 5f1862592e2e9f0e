"""fclib.sweep (grids of whole studies, shared stages run once, resumable) and fclib.compare (notebook 06)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from fclib import compare, sweep


def test_seeds_and_values_parse_as_written():
    assert sweep.parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert sweep.parse_seeds("0-1,5") == [0, 1, 5]
    for bad in ("4-0", "a", "1,1", ""):
        with pytest.raises(SystemExit):
            sweep.parse_seeds(bad)
    assert sweep.split_values("0.1,0.2") == [0.1, 0.2]
    assert sweep.split_values("[sigmoid],[sigmoid, sft]") == [["sigmoid"], ["sigmoid", "sft"]]
    assert sweep.split_values("true,false") == [True, False]


def test_grid_names_every_cell_and_orders_by_seed():
    runs = sweep.grid([0, 1], {"beta": [0.1, 0.2]}, {"a": {}, "b": {"use_reference": False}})
    assert [r.name for r in runs] == [
        "beta-0.1_a-s0",
        "beta-0.1_b-s0",
        "beta-0.2_a-s0",
        "beta-0.2_b-s0",
        "beta-0.1_a-s1",
        "beta-0.1_b-s1",
        "beta-0.2_a-s1",
        "beta-0.2_b-s1",
    ]
    assert runs[1].overrides == {"beta": 0.1, "use_reference": False, "seed": 0}
    assert [r.name for r in sweep.grid([3])] == ["s3"] and sweep.grid([3])[0].variant == "default"


def test_stage_keys_change_from_the_first_notebook_whose_inputs_change(tmp_path):
    declared = sweep.declared_parameters()
    base = yaml.safe_load((sweep.profiles.PROFILES / "smoke.yaml").read_text())
    (tmp_path / "problems").mkdir()
    (tmp_path / "problems" / "train.jsonl").write_text("train\n")
    (tmp_path / "problems" / "test.jsonl").write_text("test\n")
    keys = sweep.stage_keys(base, declared, tmp_path)
    assert len(set(keys.values())) == 5 and None not in keys.values()

    def first_change(params):
        changed = sweep.stage_keys(params, declared, tmp_path)
        return [nn for nn in keys if keys[nn] != changed[nn]]

    assert first_change({**base, "beta": 0.3}) == ["04", "05"]
    assert first_change({**base, "pair_strategy": "all"}) == ["03", "04", "05"]
    assert first_change({**base, "temperature": 0.5}) == ["02", "03", "04", "05"]
    assert first_change({**base, "eval_limit": 1}) == ["05"]
    # notebook 01's own parameters reach the later notebooks only through the problems they write
    assert first_change({**base, "fol_test": 9}) == ["01"]
    (tmp_path / "problems" / "test.jsonl").write_text("other test\n")
    assert [nn for nn, k in sweep.stage_keys(base, declared, tmp_path).items() if k != keys[nn]] == ["05"]
    assert sweep.stage_keys({**base, "run_name": "elsewhere"}, declared, tmp_path)["04"] == keys["04"]
    # before notebook 01 has run, nothing after it can match
    assert list(sweep.stage_keys(base, declared, tmp_path / "none").values())[1:] == [None] * 4


def test_the_untrained_student_is_evaluated_once_for_runs_with_the_same_test_problems(tmp_path, monkeypatch):
    from fclib import profiles

    monkeypatch.setenv("FCLIB_OUTPUTS", str(tmp_path / "out"))
    # a finished run of another sweep, with results of three models
    params = profiles.load_profile("smoke", {"run_name": "old-s0"})
    old = tmp_path / "old" / "old-s0"
    (old / "eval").mkdir(parents=True)
    (old / "problems").mkdir()
    (old / "params.yaml").write_text(yaml.safe_dump(params))
    (old / "timings.json").write_text(json.dumps({nb.stem: 1.0 for nb in profiles.notebooks()}))
    (old / "problems" / "test.jsonl").write_text("the test problems\n")
    labels = ("base", "dpo", "base+grammar")
    (old / "eval" / "results.jsonl").write_text(
        "".join(json.dumps({"source": m, "n": i}) + "\n" for i, m in enumerate(labels))
    )
    (old / "eval" / "results.meta.json").write_text(json.dumps({"sources": {m: {"model": m} for m in labels}}))

    def planned(name, test="the test problems\n", **overrides):
        s = sweep.Sweep(name, "smoke", [sweep.Run(f"{name}-s0", name, 0, overrides)], {}, reuse=[tmp_path / "old"])
        (s.folder / f"{name}-s0" / "problems").mkdir(parents=True)
        (s.folder / f"{name}-s0" / "problems" / "test.jsonl").write_text(test)
        return s, s.runs[0]

    # other training (beta), the grammar baseline asked for: base and base+grammar come from the old run
    s, run = planned("beta", beta=0.3, eval_models=["base", "dpo", "base+grammar"])
    assert s.student_results_source(run, 0) == old
    entry = {}
    s.start_from_results(run, 0, entry, "here")
    results = s.folder / run.name / "eval" / "results.jsonl"
    assert [json.loads(line)["source"] for line in results.read_text().splitlines()] == ["base", "base+grammar"]
    meta = json.loads((s.folder / run.name / "eval" / "results.meta.json").read_text())
    assert set(meta["sources"]) == {"base", "base+grammar"}
    assert entry["reused"] == [
        {"from": str(old), "notebooks": [], "files": sweep.EVAL_RESULTS, "models": ["base", "base+grammar"]}
    ]
    # not where the untrained student's evaluation would differ: its token budget, or the test problems
    s, run = planned("tokens", eval_max_tokens_per_turn=7)
    assert s.student_results_source(run, 0) is None
    s, run = planned("test", test="other test problems\n", beta=0.3)
    assert s.student_results_source(run, 0) is None
    s, run = planned("dpo-only", beta=0.3, eval_models=["dpo"])  # no untrained student asked for: nothing copied
    entry = {}
    s.start_from_results(run, 0, entry, "here")
    assert entry == {} and not (s.folder / run.name / "eval").exists()


def test_only_runs_the_matching_runs_and_leaves_the_others_for_later(tmp_path, monkeypatch):
    from fclib import pipeline, profiles

    monkeypatch.setenv("FCLIB_OUTPUTS", str(tmp_path / "out"))
    ran = []

    def fake_run(params, start=None, stop=None):  # writes what a finished notebook leaves: its time
        folder = tmp_path / "out" / "grid" / params["run_name"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "params.yaml").write_text(yaml.safe_dump(params))
        timings = json.loads((folder / "timings.json").read_text()) if (folder / "timings.json").exists() else {}
        for nb in profiles.notebooks():
            if nb.name[:2] >= start and (stop is None or nb.name[:2] <= stop):
                timings[nb.stem] = 1.0
        (folder / "timings.json").write_text(json.dumps(timings))
        ran.append((params["run_name"], start, stop))

    monkeypatch.setattr(pipeline, "run", fake_run)
    runs_ = sweep.grid([0, 1], variants={"a": {"beta": 0.2}, "b": {"beta": 0.3}})
    s = sweep.Sweep("grid", "smoke", runs_, {})
    assert s.run_all(only=["*-s1", "nothing-*"]) == []
    assert sorted({name for name, _, _ in ran}) == ["a-s1", "b-s1"]
    assert [r["status"] for r in s.state["runs"]] == ["planned", "planned", "done", "done"]
    # a later call without --only runs the rest and keeps what is done
    ran.clear()
    monkeypatch.setenv("FCLIB_OUTPUTS", str(tmp_path / "out"))  # run_all points it at the sweep's folder
    s = sweep.Sweep("grid", "smoke", sweep.grid([0, 1], variants={"a": {"beta": 0.2}, "b": {"beta": 0.3}}), {})
    assert s.run_all() == []
    assert sorted({name for name, _, _ in ran}) == ["a-s0", "b-s0"]
    assert all(r["status"] == "done" for r in s.state["runs"])
    # a pattern that matches no run is a mistake, said before anything runs
    monkeypatch.setenv("FCLIB_OUTPUTS", str(tmp_path / "out"))
    with pytest.raises(SystemExit, match="no run of the sweep matches"):
        sweep.main(["--profile", "smoke", "--seeds", "0", "--name", "grid2", "--only", "paper-*"])


def test_a_cut_record_is_set_aside_a_cut_run_named_and_a_second_sweep_refused(tmp_path, monkeypatch, caplog):
    from fclib import profiles, runs

    monkeypatch.setenv("FCLIB_OUTPUTS", str(tmp_path / "out"))
    folder = tmp_path / "out" / "grid"
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text('{"name": "gr')  # a kill during a write that was not atomic
    s = sweep.Sweep("grid", "smoke", sweep.grid([0]), {})
    assert [r["status"] for r in s.state["runs"]] == ["planned"] and "sweep.json is unreadable" in caplog.text
    assert (folder / "sweep.json.unreadable").read_text() == '{"name": "gr'

    (folder / "s0").mkdir()
    (folder / "s0" / "params.yaml").write_text("seed: [0,\n")
    with pytest.raises(SystemExit, match=r"s0/params.yaml is unreadable .*remove .*s0"):
        sweep.done_notebooks(folder / "s0", profiles.load_profile("smoke", {"run_name": "s0"}))

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time; from fclib import runs; h = runs.lock_run({str(folder)!r}, 'sweep grid')"
            "; h.__enter__(); print('held', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match=f"grid is in use by process {holder.pid} \\(sweep grid"):
            sweep.main(["--profile", "smoke", "--seeds", "0", "--name", "grid", "--no-compare"])
    finally:
        holder.kill()
        holder.wait()
    assert runs.LOCK_FILE in sweep.RUN_FILES  # a run folder's lock is no stage's output


def _table(both, base_only, dpo_only, neither):
    return {"both": both, "base_only": base_only, "other_only": dpo_only, "neither": neither}


def _result(seed, table, variant="default"):
    n = sum(table.values())
    models = {
        "base": {"fol": {"correct": table["both"] + table["base_only"], "n": n}},
        "dpo": {"fol": {"correct": table["both"] + table["other_only"], "n": n}},
    }
    valid = {"base_rate": 0.9, "other_rate": 1.0, "higher": 3, "lower": 1}
    paired = {"fol": {"table": table, "valid_calls": valid}}
    return compare.RunResult(f"s{seed}", variant, seed, {"seed": seed}, {"models": models, "paired": paired})


def test_pooled_effect_by_hand():
    from scipy.stats import binomtest, t

    tables = [_table(0, 0, 16, 24), _table(0, 1, 11, 28), _table(1, 2, 4, 33)]
    results = [_result(i, x) for i, x in enumerate(tables)]
    p = compare.pooled_effect(results, bootstrap=2000)
    # the exact stratified test: 31 DPO-only of 34 discordant problems
    assert (p["dpo_only"], p["base_only"]) == (31, 3)
    assert p["p_value"] == pytest.approx(binomtest(31, 34, 0.5).pvalue)
    assert (p["dpo_correct"], p["base_correct"], p["n"]) == (32, 4, 120)
    assert p["per_seed"] == pytest.approx([0.4, 0.25, 0.05])
    # random effects, computed here the long way
    d = np.array([16 / 40, 10 / 40, 2 / 40])
    v = np.array([(17 - 16**2 / 42) / 42**2, (13 - 10**2 / 42) / 42**2, (7 - 2**2 / 42) / 42**2])
    w = 1 / v
    q = np.sum(w * (d - np.sum(w * d) / np.sum(w)) ** 2)
    tau2 = max(0, (q - 2) / (np.sum(w) - np.sum(w**2) / np.sum(w)))
    assert tau2 > 0  # these seeds disagree more than their sizes explain
    ws = 1 / (v + tau2)
    mu = np.sum(ws * d) / np.sum(ws)
    se = np.sqrt(max(np.sum(ws * (d - mu) ** 2) / (2 * np.sum(ws)), 1 / np.sum(ws)))
    re = p["random_effects"]
    assert re["difference"] == pytest.approx(mu) and re["tau2"] == pytest.approx(tau2)
    assert re["ci95"] == pytest.approx([mu - t.ppf(0.975, 2) * se, mu + t.ppf(0.975, 2) * se])
    lo, hi = p["bootstrap_ci95"]
    assert 0 < lo < np.mean([0.4, 0.25, 0.05]) < hi < 0.45


def test_spread_between_seeds_widens_the_interval():
    same = [_result(i, _table(0, 0, 10, 30)) for i in range(3)]
    spread = [_result(0, _table(0, 0, 20, 20)), _result(1, _table(0, 0, 10, 30)), _result(2, _table(0, 0, 0, 40))]
    narrow, wide = (compare.pooled_effect(x, bootstrap=200)["random_effects"]["ci95"] for x in (same, spread))
    assert narrow[0] > 0 and wide[0] < narrow[0] and wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])
    # the same counts, so the exact stratified test cannot tell them apart: the interval is what shows the spread
    assert (
        compare.pooled_effect(same, bootstrap=10)["p_value"] == compare.pooled_effect(spread, bootstrap=10)["p_value"]
    )


def test_no_effect_is_not_significant_and_the_ablation_table_has_a_row_per_variant():
    results = [_result(i, _table(2, 3, 3, 32)) for i in range(3)]
    results += [_result(i, _table(0, 0, 9, 31), variant="more") for i in range(3)]
    p = compare.pooled_effect(results[:3], bootstrap=500)
    assert p["p_value"] == 1.0 and p["random_effects"]["ci95"][0] < 0 < p["random_effects"]["ci95"][1]
    rows = compare.ablation_table(results)
    assert [r["variant"] for r in rows] == ["default", "more"]
    assert rows[1]["DPO"] == pytest.approx(9 / 40) and rows[1]["p (stratified)"] < 1e-6


def test_grammar_comparisons_pool_like_base_and_dpo():
    results = [_result(i, _table(0, 0, 6, 34)) for i in range(3)]
    for r in results[:2]:  # two seeds also evaluated base+grammar: it solved 3 where DPO solved 6
        valid = {"base_rate": 1.0, "other_rate": 1.0, "higher": 0, "lower": 0}
        r.metrics["comparisons"] = {
            "base+grammar vs dpo": {"fol": {"table": _table(3, 0, 3, 34), "valid_calls": valid}}
        }
    assert compare.comparisons(results) == [("base+grammar", "dpo")]
    p = compare.pooled_effect(results, pair=("base+grammar", "dpo"), bootstrap=100)
    assert (p["seeds"], p["base_correct"], p["dpo_correct"], p["dpo_only"]) == (2, 6, 12, 6)
    assert p["models"] == ["base+grammar", "dpo"] and p["p_value"] == pytest.approx(2 / 2**6)
    rows = compare.comparison_table(results)
    assert [(r["first"], r["second"], r["seeds"]) for r in rows] == [
        ("base", "dpo", "0 1 2"),
        ("base+grammar", "dpo", "0 1"),
    ]
    assert rows[1]["first correct"] == "6/80" and rows[1]["second correct"] == "12/80"
    with pytest.raises(ValueError, match="no run compares dpo and dpo\\+grammar"):
        compare.pooled_effect(results, pair=("dpo", "dpo+grammar"))


def test_held_out_world_sizes_pool_each_alone(tmp_path):
    """Runs evaluated on FOL worlds of nmax 10 and 20 (the generalisation variant): notebook 05's metrics hold
    base against DPO within each size, and notebook 06 pools each size over seeds as a task of its own."""
    from fclib.evaluate import metrics
    from fclib.problems import Problem

    problems = [Problem(f"p{i}", "fol", "q", True, {"n": 3, "nmax": 10 if i < 5 else 20}) for i in range(10)]
    problems.append(Problem("g0", "gsm8k", "q", 1, {}))
    solved_by = [{"base": {"p0"}, "dpo": {"p0", "p1", "p2", "p5", "g0"}}, {"base": set(), "dpo": {"p3", "p4"}}]
    results = []
    for seed, solved in enumerate(solved_by):
        records = [
            {"source": m, "problem_id": p.id, "task": p.task, "sample": 0, "calls": [], "final_answer": None}
            | {"outcome": "correct" if p.id in solved[m] else "max_steps", "answer_correct": p.id in solved[m]}
            for m in solved
            for p in problems
        ]
        results.append(compare.RunResult(f"s{seed}", "nmax", seed, {"seed": seed}, metrics(records, problems)))
    assert compare.run_tasks(results) == ["fol", "fol n10", "fol n20", "gsm8k"]
    assert compare.split_task("fol n20") == ("fol", "20") and compare.split_task("gsm8k") == ("gsm8k", None)
    small, large = (compare.pooled_effect(results, task, bootstrap=50) for task in ("fol n10", "fol n20"))
    assert (small["n"], small["base_correct"], small["dpo_correct"], small["dpo_only"]) == (10, 1, 5, 4)
    assert (large["n"], large["base_correct"], large["dpo_correct"], large["dpo_only"]) == (10, 0, 1, 1)
    whole = compare.pooled_effect(results, "fol", bootstrap=50)
    assert whole["dpo_only"] == small["dpo_only"] + large["dpo_only"] and whole["n"] == 20
    for task, p in (("fol n10", small), ("fol n20", large), ("fol", whole)):  # the models' own counts agree
        assert p["dpo_correct"] == sum(compare.solved(r, "dpo", task) for r in results)
        assert p["base_correct"] == sum(compare.solved(r, "base", task) for r in results)
    assert compare.paired(results[0], "gsm8k n10") is None  # GSM8K has no world sizes
    assert [r["DPO"] for r in compare.ablation_table(results, "fol n10")] == [pytest.approx(0.5)]


# the smoke profile made smaller: the teacher in process (the served one is the smoke pipeline's test), fewer problems
SMALL = {"teacher_backend": "inprocess", "fol_train": 3, "gsm8k_train": 3, "fol_test": 2, "gsm8k_test": 2}


@pytest.mark.slow
def test_a_smoke_sweep_reuses_shared_stages_resumes_and_compares(tmp_path):
    """2 seeds x 2 variants that differ from notebook 03 on: each seed's problems and chains are made once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "FCLIB_"))} | {
        "FCLIB_OUTPUTS": str(tmp_path)
    }
    (tmp_path / "small.yaml").write_text(f"small: {SMALL}\n")  # one variant: every run made small
    small = ["--variants", str(tmp_path / "small.yaml")]
    command = [sys.executable, "-m", "fclib.sweep", "--profile", "smoke", "--seeds", "0-1", "--name", "sw", *small]
    command += ["-p", "max_pairs_per_problem=4,2", "--record", str(tmp_path / "record")]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "sw"
    state = json.loads((folder / "sweep.json").read_text())
    names = ["max_pairs_per_problem-4_small-s0", "max_pairs_per_problem-2_small-s0"]
    names += ["max_pairs_per_problem-4_small-s1", "max_pairs_per_problem-2_small-s1"]
    assert [r["name"] for r in state["runs"]] == names and all(r["status"] == "done" for r in state["runs"])
    assert len(state["commit"]) == 40 and state["seeds"] == [0, 1] and state["wall_s"] > 0
    assert state["axes"] == {"max_pairs_per_problem": [4, 2]}
    for leader, follower in ((0, 1), (2, 3)):
        a, b = (folder / names[i] for i in (leader, follower))
        assert state["runs"][follower]["reused"] == [
            {"from": names[leader], "notebooks": ["01", "02"]},
            {"from": names[leader], "notebooks": [], "files": sweep.EVAL_RESULTS, "models": ["base"]},
        ]
        assert "reused" not in state["runs"][leader]
        # the untrained student is evaluated once a seed: the follower's base chains are the leader's, its DPO its own
        ra, rb = (
            [json.loads(line) for line in (x / "eval" / "results.jsonl").read_text().splitlines()] for x in (a, b)
        )
        assert [r for r in rb if r["source"] == "base"] == [r for r in ra if r["source"] == "base"]
        assert {r["model"] for r in rb if r["source"] == "dpo"} != {r["model"] for r in ra if r["source"] == "dpo"}
        for rel in ("problems/train.jsonl", "chains/chains.jsonl", "chains/steps.jsonl"):
            assert (a / rel).read_bytes() == (b / rel).read_bytes()
        ta, tb = (json.loads((x / "timings.json").read_text()) for x in (a, b))
        assert {k: tb[k] for k in ta if k[:2] in ("01", "02")} == {k: ta[k] for k in ta if k[:2] in ("01", "02")}
        assert yaml.safe_load((b / "params.yaml").read_text())["max_pairs_per_problem"] == 2
        assert json.loads((b / "pairs" / "stats.json").read_text()) != json.loads(
            (a / "pairs" / "stats.json").read_text()
        )
        assert state["runs"][follower]["wall_s"] < state["runs"][leader]["wall_s"]
    # the seeds drew different problems
    assert (folder / names[0] / "problems/train.jsonl").read_bytes() != (
        folder / names[2] / "problems/train.jsonl"
    ).read_bytes()
    # notebook 06 ran on the sweep, and the record holds each run's results
    comparison = json.loads((folder / "comparison.json").read_text())
    assert comparison["runs"] == names and set(comparison["pooled"]) >= {"max_pairs_per_problem-4_small/fol"}
    assert (folder / "06_compare_runs.ipynb").is_file() and list((folder / "figures").glob("compare_forest_*.png"))
    for name in names:
        assert (tmp_path / "record" / name / "eval" / "metrics.json").is_file()
        kept = json.loads((tmp_path / "record" / name / compare.OUTCOMES).read_text())  # each problem's outcome
        assert kept == compare.problem_outcomes(folder / name / "eval" / "results.jsonl") and set(kept["outcomes"]) == {
            "base",
            "dpo",
        }
    assert json.loads((tmp_path / "record" / "sweep.json").read_text())["runs"] == state["runs"]

    # resumed: a run that lost its last notebook runs that notebook again, and nothing else runs
    last = folder / names[3]
    timings = json.loads((last / "timings.json").read_text())
    del timings["05_evaluate"]
    (last / "timings.json").write_text(json.dumps(timings))
    metrics = (last / "eval" / "metrics.json").read_bytes()
    proc = subprocess.run([*command, "--no-compare"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, name in enumerate(names[:3], 1):
        assert f"[sweep {i}/4] {name}: done before, kept" in proc.stderr
    assert f"[sweep 4/4] {names[3]}: running notebooks 05-05" in proc.stderr
    assert "01_define_tools: running" not in proc.stderr and (last / "eval" / "metrics.json").read_bytes() == metrics
    # another sweep reuses this one's finished runs: an equal run is copied whole, nothing runs
    again = [sys.executable, "-m", "fclib.sweep", "--profile", "smoke", "--seeds", "0", "--name", "sw2", "--no-compare"]
    again += [*small, "-p", "max_pairs_per_problem=2", "--reuse", str(folder)]
    proc = subprocess.run(again, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    copied = json.loads((tmp_path / "sw2" / "sweep.json").read_text())["runs"][0]
    assert copied["reused"] == [{"from": str(folder / names[1]), "notebooks": ["01", "02", "03", "04", "05"]}]
    assert "running" not in proc.stderr and copied["wall_s"] < 10
    assert (tmp_path / "sw2" / names[1] / "eval/metrics.json").read_bytes() == (
        folder / names[1] / "eval/metrics.json"
    ).read_bytes()
    # a variant that adds the grammar baseline to the evaluation copies 01-04, starts 05 from the results of
    # the run it shares them with, and evaluates only the model those lack
    grammar = {**SMALL, "max_pairs_per_problem": 2, "eval_models": ["base", "dpo", "base+grammar"]}
    (tmp_path / "v.yaml").write_text(f"grammar: {grammar}\n")
    third = [sys.executable, "-m", "fclib.sweep", "--profile", "smoke", "--seeds", "0", "--name", "sw3", "--no-compare"]
    third += ["--variants", str(tmp_path / "v.yaml"), "--reuse", str(folder)]
    proc = subprocess.run(third, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((tmp_path / "sw3" / "sweep.json").read_text())["runs"][0]
    source = str(folder / names[1])
    assert run["reused"] == [
        {"from": source, "notebooks": ["01", "02", "03", "04"]},
        {"from": source, "notebooks": [], "files": ["eval/results.jsonl", "eval/results.meta.json"]},
    ]
    lines = (tmp_path / "sw3" / "grammar-s0" / "eval/results.jsonl").read_text().splitlines()
    old = (folder / names[1] / "eval/results.jsonl").read_text().splitlines()
    assert lines[: len(old)] == old  # base and DPO kept as they were, not evaluated again
    added = [json.loads(line) for line in lines[len(old) :]]
    assert added and {r["source"] for r in added} == {"base+grammar"}
    # every call well formed, except one the token limit cut (the grammar cannot see the budget)
    unusable = [c for r in added for c in r["calls"] if c["kind"] not in ("ok", "function_error")]
    assert all(c["kind"] == "parse_error" and "unclosed" in c["error"] for c in unusable), unusable
    m = json.loads((tmp_path / "sw3" / "grammar-s0" / "eval/metrics.json").read_text())
    assert set(m["models"]) == {"base", "dpo", "base+grammar"}
    assert set(m["comparisons"]) == {"base vs base+grammar", "base+grammar vs dpo"}
    assert m["paired"] == json.loads((folder / names[1] / "eval/metrics.json").read_text())["paired"]
    # another grid under the same name is refused, not mixed in
    proc = subprocess.run([*command[:-4], "-p", "beta=0.3"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "holds another sweep" in proc.stderr


def test_two_runs_models_compare_problem_by_problem_from_their_recorded_outcomes(tmp_path):
    """A record keeps each model's outcome per held-out problem (eval/outcomes.json, not the chains): the students
    of two runs of one seed (say the SFT control's and the recipe's) are then paired on the same problems."""
    from fclib.tasks.fol import faithful

    ids = [f"fol-test-n{6 if i < 6 else 10}-d1-{i:05d}" for i in range(10)]
    ok = [{"kind": "ok", "name": "truth_values", "arguments": {"predicate": "red"}, "result": [True, False]}]
    ok += [{"kind": "ok", "name": "answer", "arguments": {"value": [True, False]}, "result": None}]
    copied_wrong = [*ok[:1], {"kind": "ok", "name": "answer", "arguments": {"value": [True]}, "result": None}]
    assert faithful(ok) and not faithful(copied_wrong)

    def results(folder, solved, unfaithful=()):
        rows = [
            {"source": "dpo", "task": "fol", "problem_id": pid, "sample": s}
            | {"outcome": "correct" if pid in solved and not s else "max_steps"}
            | {"calls": copied_wrong if pid in unfaithful else ok}
            for pid in ids
            for s in (0, 1)  # a second sample: not counted
        ]
        rows.append({"source": "base", "task": "gsm8k", "problem_id": "g", "sample": 0, "outcome": "correct"})
        (folder / "eval").mkdir(parents=True)
        (folder / "eval" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "eval" / "metrics.json").write_text("{}")
        return folder

    sft = results(tmp_path / "sft-only-s0", solved={ids[0], ids[1], ids[7]})
    recipe = results(tmp_path / "default-s0", solved={ids[1], ids[2], ids[3], ids[8]}, unfaithful={ids[2]})
    outcomes = compare.problem_outcomes(recipe / "eval" / "results.jsonl")
    assert outcomes["faithful"] == {"dpo": sorted([ids[1], ids[3], ids[8]])}
    assert outcomes["outcomes"]["base"] == {"gsm8k": {"g": "correct"}}
    assert (
        list(outcomes["outcomes"]["dpo"]["fol"]) == sorted(ids)
        and outcomes["outcomes"]["dpo"]["fol"][ids[2]] == "correct"
    )

    a, b = compare.load_runs([sft, recipe])
    assert compare.cross_table(a, "dpo", b, "dpo") == {"both": 1, "base_only": 2, "other_only": 3, "neither": 4}
    assert compare.cross_table(a, "dpo", b, "dpo", "fol n10") == {
        "both": 0,
        "base_only": 1,
        "other_only": 1,
        "neither": 2,
    }
    assert compare.mcnemar_p({"both": 5, "base_only": 0, "other_only": 6, "neither": 1}) == pytest.approx(2 / 2**6)
    pooled = compare.pooled_tables([compare.cross_table(a, "dpo", b, "dpo")] * 2, "fol", ["sft-only", "default"])
    assert (pooled["base_only"], pooled["dpo_only"], pooled["n"]) == (4, 6, 20)
    # what a record keeps is enough: the same tables from eval/outcomes.json without the results
    for run in (sft, recipe):
        kept = compare.problem_outcomes(run / "eval" / "results.jsonl")
        (run / "eval" / "results.jsonl").unlink()
        (run / compare.OUTCOMES).write_text(json.dumps(kept))
    a2, b2 = compare.load_runs([sft, recipe])
    assert compare.cross_table(a2, "dpo", b2, "dpo") == compare.cross_table(a, "dpo", b, "dpo")
    with pytest.raises(ValueError, match="keeps no outcomes of teacher"):
        compare.cross_table(a2, "teacher", b2, "dpo")
    other = results(tmp_path / "other-s0", solved=set())
    (other / "eval" / "results.jsonl").write_text(
        (other / "eval" / "results.jsonl").read_text().replace("-00009", "-00099")
    )
    with pytest.raises(ValueError, match="evaluated on different fol problems"):
        compare.cross_table(a2, "dpo", compare.load_runs([other])[0], "dpo")
