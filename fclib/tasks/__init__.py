"""The study's tasks: first-order logic (`fol`) and GSM8K math (`gsm8k`).

Each task module provides a `TASK` (instructions, toolset per problem, checker, a worked
example) and `reference_calls(problem)`, a correct chain of calls derived from the ground
truth. `replay_references` runs those chains through the real agent and executor.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from fclib.agent import AgentConfig, Chain, Task, run_chains
from fclib.backends.scripted import ScriptedBackend
from fclib.problems import Problem
from fclib.protocol import format_call
from fclib.settings import Settings
from fclib.tasks import fol, gsm8k

TASKS: dict[str, Task] = {fol.NAME: fol.TASK, gsm8k.NAME: gsm8k.TASK}
_REFERENCE = {fol.NAME: fol.reference_calls, gsm8k.NAME: gsm8k.reference_calls}
REFERENCE_MODEL = "reference"


def reference_script(problem: Problem) -> list[str]:
    """The reference chain of a problem as the text of its calls; ValueError if there is none."""
    return [format_call(name, kwargs) for name, kwargs in _REFERENCE[problem.task](problem)]


def replay_references(problems: Sequence[Problem], progress: bool = False) -> list[Chain]:
    """Replay each problem's reference chain through the agent; a problem without one gets an `error` chain."""
    scripts, chains = {}, []
    for p in problems:
        try:
            scripts[p.question] = reference_script(p)
        except ValueError as e:
            chains.append(
                Chain(p.id, p.task, 0, REFERENCE_MODEL, REFERENCE_MODEL, [], 0, outcome="error", reason=str(e))
            )
    have = [p for p in problems if p.question in scripts]
    steps = max((len(s) for s in scripts.values()), default=1)
    config = AgentConfig(max_steps=steps + 1, max_retries=0, max_chain_tokens=10**9)
    chains += run_chains(ScriptedBackend(scripts, REFERENCE_MODEL), TASKS, have, config, progress=progress)
    order = {p.id: i for i, p in enumerate(problems)}
    return sorted(chains, key=lambda c: order[c.problem_id])


@dataclass
class ProblemSettings(Settings):
    """Notebook 01: which problems a run trains and tests on; the defaults are the `cpu` profile's."""

    seed: int = 0
    fol_train: int = 20  # FOL training problems per nmax
    fol_test: int = 40  # FOL held-out problems per nmax
    nmax: int | list[int] = 6  # at most this many individuals per world; a list: problems for each
    test_nmax: list[int] = field(default_factory=list)  # held-out FOL worlds of these sizes instead; empty: nmax's
    depth: int = 1  # nesting depth of the question formula
    gsm8k_train: int = 4  # GSM8K training problems, a seeded sample of the official split
    gsm8k_test: int = 10  # GSM8K held-out problems
    gsm8k_source: str = ""  # empty: the copy shipped in fclib/data/gsm8k; or a folder, or a hub id
    demo_problems: int = 1  # problems per task the untrained student tries in notebook 01

    def faults(self) -> list[str]:
        sizes = self.nmax if isinstance(self.nmax, list) else [self.nmax]
        wrong = []
        if not sizes or not all(isinstance(n, int) and 2 <= n <= len(fol.INDIVIDUALS) for n in sizes):
            wrong.append(f"nmax must be integers from 2 to {len(fol.INDIVIDUALS)}, got {self.nmax!r}")
        if not all(isinstance(n, int) and 2 <= n <= len(fol.INDIVIDUALS) for n in self.test_nmax):
            wrong.append(f"test_nmax must be integers from 2 to {len(fol.INDIVIDUALS)}, got {self.test_nmax!r}")
        counts = (self.fol_train, self.fol_test, self.gsm8k_train, self.gsm8k_test, self.demo_problems, self.depth)
        if min(counts) < 0:
            wrong.append("fol_train, fol_test, gsm8k_train, gsm8k_test, demo_problems and depth must be >= 0")
        if self.fol_train + self.gsm8k_train <= 0:
            wrong.append("no training problems: fol_train and gsm8k_train are both 0")
        if self.fol_test + self.gsm8k_test <= 0:
            wrong.append("empty test set: fol_test and gsm8k_test are both 0")
        return wrong

    def build(self) -> tuple[list[Problem], list[Problem]]:
        """The train and test problems (`build_problems` with these settings)."""
        return build_problems(
            self.seed,
            self.fol_train,
            self.fol_test,
            self.gsm8k_train,
            self.gsm8k_test,
            nmax=self.nmax,
            depth=self.depth,
            gsm8k_source=self.gsm8k_source,
            test_nmax=self.test_nmax,
        )


def build_problems(
    seed: int,
    fol_train: int,
    fol_test: int,
    gsm8k_train: int,
    gsm8k_test: int,
    nmax: int | Sequence[int] = 6,
    depth: int = 1,
    gsm8k_source: str | None = None,
    test_nmax: Sequence[int] = (),
) -> tuple[list[Problem], list[Problem]]:
    """The train and test problems of a run, deterministic from the seed, never sharing a problem.

    FOL problems are generated for each `nmax` given, the held-out ones for each `test_nmax`
    instead when given (to test on larger worlds than the training ones: the training problems
    stay the same); GSM8K problems are a seeded sample of the official train and test splits
    (`gsm8k_source`: a folder of JSONL files, or the hub).
    """

    train: list[Problem] = []
    test: list[Problem] = []

    def held_out(n: int) -> list[Problem]:
        seen = {p.question for p in train}
        generated = fol.generate(fol_test + len(seen), seed, nmax=n, depth=depth, split="test")
        return [p for p in generated if p.question not in seen][:fol_test]

    for n in [nmax] if isinstance(nmax, int) else list(nmax):
        train += fol.generate(fol_train, seed, nmax=n, depth=depth, split="train")
        if not test_nmax:
            test += held_out(n)
    for n in test_nmax:
        test += held_out(n)
    for split, count, out in (("train", gsm8k_train, train), ("test", gsm8k_test, test)):
        if count:  # a generator per split: the held-out sample does not depend on how many train problems there are
            pool = gsm8k.load(split, gsm8k_source)
            out += random.Random(f"gsm8k-{seed}-{split}").sample(pool, min(count, len(pool)))
    return train, test
