"""End to end: the embedded SmolLM2 solves a few problems through the agent (slow)."""

import json

import pytest

from fclib.agent import OUTCOMES, AgentConfig, run_chains
from fclib.backends.local import LocalBackend
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


def test_the_prefix_cache_changes_how_much_is_computed_not_what(gsm8k_dir):
    from fclib.tasks import TASKS, fol

    cached = LocalBackend.load("embedded", batch_size=3)
    plain = LocalBackend(cached.model, cached.tokenizer, model_id="embedded", batch_size=3, prefix_cache=False)
    # Mixed tasks and prompt lengths, batches of 3 out of 4: rows reuse caches of different lengths.
    problems = fol.generate(2, seed=4, nmax=6, split="test") + gsm8k.load("test", gsm8k_dir)[:2]
    config = AgentConfig(max_steps=3, max_tokens_per_turn=24)
    with_cache = run_chains(cached, TASKS, problems, config, progress=False)
    without = run_chains(plain, TASKS, problems, config, progress=False)
    assert [c.messages for c in with_cache] == [c.messages for c in without]
    assert [c.outcome for c in with_cache] == [c.outcome for c in without]
    stats = cached.cache_stats
    assert stats["reused_tokens"] > 0.6 * stats["prompt_tokens"]  # steps 2 and 3 reuse almost everything
