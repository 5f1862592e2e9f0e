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
