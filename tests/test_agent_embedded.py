"""End to end: the embedded SmolLM2 solves a few problems through the agent (slow)."""

import json

import pytest

from fclib.agent import OUTCOMES, AgentConfig, run_chains
from fclib.llm import LocalBackend
from fclib.tasks import gsm8k

pytestmark = pytest.mark.slow


def test_embedded_model_runs_the_agent_and_chain_records_are_well_formed(gsm8k_dir):
    backend = LocalBackend.load("embedded")
    problems = gsm8k.load("test", gsm8k_dir)[:4]
    chains = run_chains(backend, gsm8k.TASK, problems, AgentConfig(max_steps=3, max_tokens_per_turn=32), progress=False)
    assert len(chains) == 4
    for chain, problem in zip(chains, problems):
        record = json.loads(json.dumps(chain.to_dict()))
        assert record["problem_id"] == problem.id and record["model"] == "embedded"
        assert record["outcome"] in OUTCOMES and record["outcome"] != "error"
        assert 1 <= record["steps"] <= 3 and len(record["calls"]) == record["steps"]
        assert record["messages"][record["n_prompt"] - 1] == {"role": "user", "content": problem.question}
        assert record["usage"]["prompt_tokens"] > 100 and record["usage"]["completion_tokens"] > 0
        roles = [m["role"] for m in record["messages"][record["n_prompt"] :]]
        assert roles[0::2] == ["assistant"] * len(roles[0::2])  # assistant turn, then feedback
        for call in record["calls"]:
            assert call["kind"] in ("ok", "parse_error", "invalid_call", "function_error")
            assert (call["error"] is None) == (call["kind"] == "ok")
        assert record["correct"] == (record["outcome"] == "correct")
