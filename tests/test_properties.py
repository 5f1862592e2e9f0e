"""Property-based tests: whatever text a model or endpoint returns, and wherever a run is killed.

Hypothesis throws arbitrary text (any Unicode, lone surrogates too), call-shaped fragments and
truncations at the parser, the agent and the chain ledger, and checks what must always hold:
no exception escapes but `CallSyntaxError`, nothing is evaluated, every chain ends with a named
outcome, every record round-trips through its JSONL line, and a ledger cut at any byte resumes
to the chains of a run that was never interrupted.
"""

from __future__ import annotations

import ast
import builtins
import json
from contextlib import contextmanager
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fclib.agent import OUTCOMES, AgentConfig, run_chains
from fclib.backends import Reply
from fclib.backends.scripted import ScriptedBackend
from fclib.chains import generate, read_chains
from fclib.protocol import CallSyntaxError, ParsedCall, parse_call
from fclib.runs import jsonl_line
from fclib.tasks import TASKS, fol, reference_script

EXAMPLES = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ANY_CHAR = st.characters(codec=None, exclude_categories=())  # every code point, lone surrogates included
FRAGMENTS = [
    "add(",
    "answer(",
    "truth_values(",
    "exists(",
    "final_answer(",
    "жadd(",
    "f(",
    "(",
    ")",
    "[",
    "]",
    "a=",
    "b=",
    "value=",
    "predicate=",
    "values=",
    "1",
    "-2",
    "3.5",
    "1e308",
    "True",
    "None",
    "'x'",
    '"y"',
    "'",
    '"',
    "\\",
    ", ",
    "\n",
    "```python\n",
    "```",
    ".",
    "__import__('os')",
    "lambda: 1",
    "**",
    "*",
    "é",
    "\udcff",
    "\x00",
    " ",
    "it's ",
]
CALL_SHAPED = st.lists(st.sampled_from(FRAGMENTS) | st.text(ANY_CHAR, max_size=3), max_size=40).map("".join)
REPLIES = st.text(ANY_CHAR, max_size=300) | CALL_SHAPED
PLAIN = (bool, int, float, str, type(None))


@contextmanager
def nothing_evaluated():
    """While the block runs, eval and exec of source text, and compiling text beyond a syntax tree, fail.

    Code objects still run (that is how modules are imported); text never does.
    """
    real = builtins.eval, builtins.exec, builtins.compile

    def guard(run: Any) -> Any:
        def guarded(source: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(source, (str, bytes)):
                raise AssertionError(f"text reached {run.__name__}: {source[:80]!r}")
            return run(source, *args, **kwargs)

        return guarded

    def parse_only(source: Any, filename: Any, mode: Any, flags: int = 0, *args: Any, **kwargs: Any) -> Any:
        if not flags & ast.PyCF_ONLY_AST:
            raise AssertionError(f"text was compiled to code: {str(source)[:80]!r}")
        return real[2](source, filename, mode, flags, *args, **kwargs)

    builtins.eval, builtins.exec, builtins.compile = guard(real[0]), guard(real[1]), parse_only
    try:
        yield
    finally:
        builtins.eval, builtins.exec, builtins.compile = real


def test_the_guard_catches_evaluation():
    import pytest

    for attempt in (lambda: eval("1 + 1"), lambda: exec("x = 1"), lambda: compile("1", "<m>", "eval")):
        with nothing_evaluated(), pytest.raises(AssertionError, match="text"):
            attempt()
    with nothing_evaluated():
        assert isinstance(ast.parse("add(a=1)", mode="eval"), ast.Expression)  # parsing to a tree is allowed
        exec((lambda: None).__code__)  # and code objects run (imports)


def _plain(value: Any) -> bool:
    return all(_plain(v) for v in value) if isinstance(value, list) else isinstance(value, PLAIN)


@EXAMPLES
@given(text=REPLIES)
@example(text="A(```)")  # once returned the call text "A(\n)", which the reply does not hold
@example(text="```python\nadd(a=`1`, b=2)```")
def test_the_parser_returns_a_literal_call_or_a_named_refusal(text):
    with nothing_evaluated():
        try:
            call = parse_call(text, {"add", "answer"})
        except CallSyntaxError as e:
            assert str(e)
            return
    assert isinstance(call, ParsedCall) and call.name.isidentifier()
    assert all(_plain(a) for a in call.args) and all(_plain(v) for v in call.kwargs.values())
    assert call.text and call.text in text  # the call as the reply wrote it, not something made up


@EXAMPLES
@given(text=REPLIES, cut=st.integers(min_value=0, max_value=400))
def test_the_parser_takes_any_truncation(text, cut):
    for piece in (text[:cut], "add(a=2, b=3)"[: cut % 14], text[cut:]):
        with nothing_evaluated():
            try:
                parse_call(piece, {"add"})
            except CallSyntaxError:
                pass


class Replies:
    """A backend answering every turn with the next of `texts` (cycling): arbitrary model output."""

    model_id = "hypothesis"

    def __init__(self, texts: list[str]):
        self.texts, self.n = texts, 0

    def chat(self, conversations, settings, tools=None):
        out = []
        for _ in conversations:
            out.append(Reply(self.texts[self.n % len(self.texts)], 5, 5))
            self.n += 1
        return out


PROBLEM = fol.generate(1, seed=11, nmax=4, split="train")[0]


@FEW
@given(texts=st.lists(REPLIES, min_size=1, max_size=6))
def test_the_agent_ends_every_chain_with_a_named_outcome_and_records_round_trip(texts):
    with nothing_evaluated():
        chains = run_chains(
            Replies(texts), TASKS, [PROBLEM], AgentConfig(max_steps=5, max_retries=2), samples=2, progress=False
        )
    for chain in chains:
        assert chain.outcome in OUTCOMES
        record = chain.to_dict()
        line = jsonl_line(record)
        assert line.endswith("\n") and line.count("\n") == 1
        line.encode("utf-8")  # writable whatever the model said
        assert jsonl_line(json.loads(line)) == line  # read back to the same record (NaN included)


@FEW
@given(texts=st.lists(REPLIES, min_size=1, max_size=4), data=st.data())
def test_a_ledger_cut_at_any_byte_resumes_to_the_uninterrupted_chains(tmp_path_factory, texts, data):
    folder = tmp_path_factory.mktemp("ledger")
    problems = fol.generate(2, seed=12, nmax=4, split="train")
    config = AgentConfig(max_steps=4, max_retries=1)
    backend = ScriptedBackend({problems[0].question: texts, problems[1].question: reference_script(problems[1])}, "t")
    whole = generate(backend, problems, folder / "whole.jsonl", k=2, config=config, progress=False)
    raw = (folder / "whole.jsonl").read_bytes()
    cut = data.draw(st.integers(min_value=0, max_value=len(raw)), label="cut at byte")
    killed = folder / "killed.jsonl"
    killed.write_bytes(raw[:cut])
    with nothing_evaluated():
        partial, left_out = read_chains(killed)
    start = raw.rfind(b"\n", 0, cut) + 1  # the last line kept, whole or cut
    tail, line = raw[start:cut], raw[start : raw.index(b"\n", start)] if start < len(raw) else b""
    assert left_out == int(tail not in (b"", line))  # a whole record missing only its newline is read
    wanted = {json.dumps(r, sort_keys=True) for r in whole}
    assert all(json.dumps(r, sort_keys=True) in wanted for r in partial)  # every record read is a whole one

    resumed = generate(backend, problems, killed, k=2, config=config, progress=False)
    assert [json.dumps(r, sort_keys=True) for r in resumed] == [json.dumps(r, sort_keys=True) for r in whole]
    assert read_chains(killed)[1] == 0 and len(killed.read_bytes().splitlines()) == len(whole)
    if left_out:
        assert (folder / "killed.jsonl.cut").read_bytes() == tail + b"\n"  # kept for inspection, byte for byte
