"""The README and docs name only files that exist, and the README's commands are the ones the project has."""

import re

from fclib.runs import PROJECT_ROOT

DOCS = [
    PROJECT_ROOT / "README.md",
    PROJECT_ROOT / "docs" / "results.md",
    PROJECT_ROOT / "fclib" / "data" / "gsm8k" / "README.md",
]


def test_every_relative_link_in_the_docs_points_to_a_file():
    missing = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (doc.parent / target.split("#")[0]).exists():
                missing.append(f"{doc.relative_to(PROJECT_ROOT)} -> {target}")
    assert not missing, missing


def test_the_readme_starts_with_the_two_commands_and_the_notebooks():
    readme = (PROJECT_ROOT / "README.md").read_text()
    first_screen = readme[: readme.index("## Running it")]
    assert "./study.sh" in first_screen and "./test.sh" in first_screen and "docs/results.md" in first_screen
    for nb in sorted((PROJECT_ROOT / "notebooks").glob("0*.ipynb")):
        assert f"(notebooks/{nb.name})" in first_screen and f"(docs/notebooks/{nb.stem}.html)" in first_screen


def test_the_readme_measurements_are_the_block_the_records_make(tmp_path):
    """The README's measured numbers come from docs/runs/ and docs/benchmarks/ through scripts/measured.py."""
    import json
    import subprocess
    import sys

    from scripts.measured import START, block

    readme = (PROJECT_ROOT / "README.md").read_text()
    assert block() in readme, "run `python scripts/measured.py --write` after adding a record"
    run = tmp_path / "docs" / "runs" / "x"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"commit": "abc", "command": "./study.sh", "pipeline_seconds": 725}))
    (run / "timings.json").write_text(json.dumps({"01_a": 20.4, "04_b": 300.0}))
    (run / "memory.json").write_text(json.dumps({"01_a": 1.5, "04_b": 5.25}))
    made = block(tmp_path)
    assert made.startswith(START) and "| `./study.sh` at abc | 12 min 05 s (20, 300 s) | peak 5.25 GiB in 04 |" in made
    printed = subprocess.run([sys.executable, "scripts/measured.py"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert printed.returncode == 0 and printed.stdout.strip() == block()


def test_the_readme_headline_is_the_table_the_control_sweep_makes(tmp_path):
    """The README's headline table comes from docs/sweeps/cpu-controls through scripts/headline.py: here a sweep of
    two seeds made up record by record, its numbers worked out by hand."""
    import json
    import subprocess
    import sys

    from fclib.compare import OUTCOMES, problem_outcomes
    from fclib.evaluate import metrics
    from fclib.problems import Problem
    from scripts import headline

    problems = [Problem(f"fol-test-n6-d1-{i:05d}", "fol", "q", True, {"n": 3, "nmax": 6}) for i in range(10)]
    solved = {  # (variant, seed): the problems its trained student solves; the base student solves p0 on seed 1
        ("default", 0): {0, 1, 2, 3, 4, 5},
        ("default", 1): {0, 1, 2, 3, 4, 5, 6},
        ("sft-only", 0): {0, 1},
        ("sft-only", 1): {7},
        ("dpo-only", 0): set(),
        ("dpo-only", 1): {0},
    }
    folder = tmp_path / headline.CONTROLS
    entries = []
    for (variant, seed), ids in solved.items():
        run = folder / f"{variant}-s{seed}"
        (run / "eval").mkdir(parents=True)
        records = [
            {"source": m, "problem_id": p.id, "task": "fol", "sample": 0, "calls": [], "final_answer": None}
            | {"outcome": "correct" if ok else "max_steps", "answer_correct": ok}
            for p in problems
            for m, ok in (("base", seed == 1 and p.id.endswith("0")), ("dpo", int(p.id[-5:]) in ids))
        ]
        (run / "eval" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (run / OUTCOMES).write_text(json.dumps(problem_outcomes(run / "eval" / "results.jsonl")))
        (run / "eval" / "results.jsonl").unlink()  # a record keeps the outcomes, not the chains
        (run / "eval" / "metrics.json").write_text(json.dumps(metrics(records, problems)))
        (run / "params.yaml").write_text(f"seed: {seed}\n")
        entries.append({"name": run.name, "variant": variant, "seed": seed, "status": "done"})
    session = {"commit": {"commit": "abcdef0123", "dirty": False}}
    record = {"name": "cpu-controls", "profile": "cpu", "seeds": [0, 1, 2], "runs": entries, "sessions": [session]}
    (folder / "sweep.json").write_text(json.dumps(record))
    made = headline.block(tmp_path).splitlines()
    assert made[0] == headline.START and made[-1] == headline.END
    assert "seeds 0, 1 (seeds 0-2 planned; the others not finished yet)" in made[1] and "at commit abcdef0" in made[1]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in made if line.startswith("| ")}
    assert rows["base (untrained)"][1:3] == ["1/20", "0 1"]
    recipe = rows["DPO + SFT term (fclib's recipe)"]
    assert recipe[1:3] == ["**13/20**", "6 7"]
    assert recipe[5] == "2 of 2"  # each seed: 6 problems the recipe alone solved, none base alone: p = 2 / 2**6
    assert (
        recipe[7].strip(" |") == "+10 problems (0.0063)"
    )  # against SFT: 11 recipe alone (4 + 7), 1 SFT alone (p7): 26 / 2**12
    sft = rows["SFT on the chosen sides only"]
    assert sft[1:3] == ["**3/20**", "2 1"] and sft[7].strip(" |") == ""

    by_seed = headline.seeds_block(tmp_path).splitlines()
    assert by_seed[4] == (  # seed 1: base solves p0, SFT p7, plain DPO p0, the recipe p0-p6
        "| 1 | 1/10, 0.0% valid | **1**/10 (p 1), 0.0% valid | **1**/10 (p 1), 0.0% valid "
        "| **7**/10 (p 0.031), 0.0% valid |"
    )

    readme = (PROJECT_ROOT / "README.md").read_text()
    results = (PROJECT_ROOT / "docs" / "results.md").read_text()
    assert headline.block() in readme, "run `python scripts/headline.py --write` after the sweep's records change"
    assert headline.seeds_block() in results, "run `python scripts/headline.py --write` after the records change"
    printed = subprocess.run([sys.executable, "scripts/headline.py"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert printed.returncode == 0 and printed.stdout.strip() == headline.block() + "\n\n" + headline.seeds_block()
