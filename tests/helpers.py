"""Chains made by replaying scripts through the real agent, for pair and training tests."""

from __future__ import annotations

from fclib.agent import AgentConfig, run_chains
from fclib.backends.scripted import ScriptedBackend
from fclib.tasks import TASKS, reference_script


def scripted_chain(problem, script, sample=0, source="teacher"):
    """The chain record of `script` (call texts) played for `problem`."""
    backend = ScriptedBackend({problem.question: script}, model_id=source)
    (c,) = run_chains(
        backend,
        TASKS,
        [problem],
        AgentConfig(max_steps=8, max_retries=1),
        samples=[sample],
        progress=False,
        source=source,
    )
    return c.to_dict()


def fol_chains(problem):
    """Two verified chains, a lucky guess, a chain of bad calls, and the reference."""
    ref = reference_script(problem)
    guess = f"answer(value={problem.answer})"
    return [
        scripted_chain(problem, ref, 0),
        scripted_chain(problem, ref, 1),
        scripted_chain(problem, [ref[0], guess], 2),  # right answer, facts not looked up: rejected
        scripted_chain(problem, [ref[0], "look()", "look()"], 3),
        scripted_chain(problem, ref, 0, source="reference"),
    ]
