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
