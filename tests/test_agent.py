"""The agent loop, driven by scripted replies: every ending has its named outcome."""

import json

import pytest

from fclib.agent import AgentConfig, outcome_counts, run_chains, transcript
from fclib.backends import Reply
from fclib.problems import Problem
from fclib.tasks.gsm8k import TASK

PROBLEM = Problem("p1", "gsm8k", "Tom has 3 apples and buys 5 more. How many apples?", 8.0)


def solve(queue_backend, replies, **config):
    backend = queue_backend(replies)
    (chain,) = run_chains(backend, TASK, [PROBLEM], AgentConfig(**config), progress=False)
    json.dumps(chain.to_dict())  # every record is JSON-serialisable
    return chain, backend


def test_prompt_holds_instructions_functions_examples_and_problem(queue_backend):
    chain, backend = solve(queue_backend, ["final_answer(value=8)"])
    system = backend.sent[0][0]
    assert system["role"] == "system"
    assert "divide(a: number, b: number)" in system["content"] and "Example: add(a=48, b=24) -> 72" in system["content"]
    assert "one function call per turn" in system["content"]
    assert backend.sent[0][chain.n_prompt - 1] == {"role": "user", "content": PROBLEM.question}
    assert chain.messages[: chain.n_prompt] == backend.sent[0]


def test_correct_chain(queue_backend):
    chain, backend = solve(queue_backend, ["add(a=3, b=5)", "final_answer(value=8)"])
    assert chain.outcome == "correct" and chain.correct and chain.final_answer == 8
    assert [c["name"] for c in chain.calls] == ["add", "final_answer"]
    assert chain.calls[0]["result"] == 8 and chain.calls[0]["error"] is None
    assert backend.sent[1][-1] == {"role": "user", "content": "Result: 8"}
    assert chain.usage == {"prompt_tokens": 20, "completion_tokens": 10} and chain.steps == 2
    assert "=> correct, answer 8" in transcript(chain)


def test_wrong_answer(queue_backend):
    chain, _ = solve(queue_backend, ["final_answer(value=7)"])
    assert chain.outcome == "wrong_answer" and not chain.correct and chain.final_answer == 7


def test_errors_are_fed_back_and_the_chain_goes_on(queue_backend):
    hostile = [
        "__import__('os').system('id')",
        "divide(a=8, b=0)",
        "x" * 5000,
        "add(a=3, b=5)\nmultiply(a=2, b=2)",
        "final_answer(value=8)",
    ]
    chain, backend = solve(queue_backend, hostile, max_retries=3)
    assert chain.outcome == "correct"
    kinds = [c["kind"] for c in chain.calls]
    assert kinds == ["parse_error", "function_error", "parse_error", "ok", "ok"]
    feedback = [m["content"] for m in chain.messages[chain.n_prompt :] if m["role"] == "user"]
    assert feedback[0].startswith("Error: ") and "not allowed" in feedback[0]
    assert feedback[1] == "Error: division by zero"
    assert "only the first" in feedback[3]


def test_retry_limit_ends_with_invalid_call(queue_backend):
    chain, _ = solve(queue_backend, ["hello", "fly(a=1)", "add(a=1)", "???"], max_retries=2)
    assert chain.outcome == "invalid_call" and chain.steps == 3
    assert "3 turns in a row" in chain.reason


def test_function_errors_do_not_count_as_retries(queue_backend):
    chain, _ = solve(queue_backend, ["divide(a=1, b=0)"] * 4 + ["final_answer(value=8)"], max_retries=1)
    assert chain.outcome == "correct"


def test_step_limit(queue_backend):
    chain, _ = solve(queue_backend, ["add(a=1, b=1)"] * 10, max_steps=3)
    assert chain.outcome == "max_steps" and chain.steps == 3


def test_token_limit(queue_backend):
    big = Reply("add(a=1, b=1)", prompt_tokens=900, completion_tokens=200)
    chain, _ = solve(queue_backend, [big, big], max_chain_tokens=1000)
    assert chain.outcome == "no_answer" and "token limit" in chain.reason and chain.steps == 1


def test_backend_failure_ends_the_batch_with_error(queue_backend):
    chain, _ = solve(queue_backend, ["add(a=3, b=5)", ConnectionError("server went away")])
    assert chain.outcome == "error" and "server went away" in chain.reason
    assert chain.calls[0]["result"] == 8  # what happened before the failure is kept


def test_reply_error(queue_backend):
    chain, _ = solve(queue_backend, [Reply("", 0, 0, "error", error="HTTP 500 after 3 retries")])
    assert chain.outcome == "error" and chain.reason == "HTTP 500 after 3 retries"


def test_many_problems_and_samples_in_one_batch(queue_backend):
    problems = [Problem(f"p{i}", "gsm8k", f"What is {i} plus 1?", float(i + 1)) for i in range(3)]
    backend = queue_backend([f"final_answer(value={i + 1})" for i in range(3) for _ in range(2)])
    chains = run_chains(backend, TASK, problems, AgentConfig(), samples=2, progress=False)
    assert [(c.problem_id, c.sample) for c in chains] == [(f"p{i}", s) for i in range(3) for s in range(2)]
    assert outcome_counts(chains)["correct"] == 6 and len(backend.sent) == 6


def test_native_tool_calls(queue_backend):
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 3, "b": 5}'}}
    final = {"id": "c2", "type": "function", "function": {"name": "final_answer", "arguments": '{"value": 8}'}}
    replies = [Reply("", 10, 5, tool_calls=[call]), Reply("", 10, 5, tool_calls=[final])]
    chain, backend = solve(queue_backend, replies, protocol="native")
    assert chain.outcome == "correct" and chain.tools and chain.tools[0]["type"] == "function"
    assert chain.messages[chain.n_prompt]["tool_calls"] == [call]
    assert chain.messages[chain.n_prompt + 1] == {"role": "tool", "tool_call_id": "c1", "content": "Result: 8"}


def test_missing_task_is_a_clear_error(queue_backend):
    with pytest.raises(ValueError, match="no Task given"):
        run_chains(queue_backend([]), TASK, [Problem("x", "fol", "?", True)], progress=False)


def test_bad_config():
    with pytest.raises(ValueError):
        AgentConfig(max_steps=0)


def test_prompts_alternate_roles_for_strict_chat_templates(queue_backend):
    from fclib.tasks import fol

    for task, problem in ((TASK, PROBLEM), (fol.TASK, fol.generate(1, seed=0)[0])):
        backend = queue_backend(["nonsense", "final_answer(value=8)"])
        run_chains(backend, task, [problem], AgentConfig(max_steps=2), progress=False)
        roles = [m["role"] for m in backend.sent[1]]
        assert roles[0] == "system" and roles[1] == "user"
        assert all(a != b for a, b in zip(roles[1:], roles[2:])), roles


def test_demonstration_results_are_computed_by_the_toolset():
    from fclib.agent import demo_messages
    from fclib.tasks.gsm8k import TOOLSET

    turns = demo_messages("q?", TOOLSET, ["add(a=2, b=3)", "final_answer(value=5)"])
    assert [t["content"] for t in turns] == ["q?", "add(a=2, b=3)", "Result: 5", "final_answer(value=5)"]
    with pytest.raises(ValueError, match="division by zero"):
        demo_messages("q?", TOOLSET, ["divide(a=1, b=0)"])
