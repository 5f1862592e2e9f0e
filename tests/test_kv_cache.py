"""Reusing keys/values across turns and chains changes how much is computed, never what."""

import pytest
import torch

from fclib.backends import GenerationSettings
from fclib.backends.local import LocalBackend
from fclib.fast.kv_cache import buffer_layer, common_prefix, use_gqa_sdpa
from fclib.models import tiny_model

SYSTEM = "You answer questions by calling functions. " * 12  # a shared prefix well over 64 tokens
QUESTIONS = ["Is every cat red?", "Is some dog round and soft?", "Does anyone hold the key?"]


def _run_chains(backend: LocalBackend, turns: int = 3) -> list[list[str]]:
    """Chains that share a system prompt; each turn appends the reply and a feedback message."""
    conversations = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]
    settings = GenerationSettings(max_tokens=8)
    replies: list[list[str]] = [[] for _ in conversations]
    for turn in range(turns):
        for i, reply in enumerate(backend.chat(conversations, settings)):
            replies[i].append(reply.text)
            conversations[i] += [
                {"role": "assistant", "content": reply.text},
                {"role": "user", "content": f"Result: {turn}"},
            ]
    return replies


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_model(seed=3)


def test_cached_chains_equal_uncached_ones_across_batches_turns_and_eviction(model_and_tokenizer):
    model, tok = model_and_tokenizer
    plain = _run_chains(LocalBackend(model, tok, batch_size=2, prefix_cache=False))
    cached = LocalBackend(model, tok, batch_size=2)
    assert _run_chains(cached) == plain
    stats = cached.cache_stats
    assert stats["shared_prefill_tokens"] > 64  # the system prompt was computed once, for all three
    assert stats["reused_tokens"] > 0.8 * stats["prompt_tokens"]
    assert len(cached.kv.entries) == len(QUESTIONS)
    # A budget smaller than one batch drops conversations; what is left still reuses correctly.
    starved = LocalBackend(model, tok, batch_size=2, cache_tokens=10)
    assert _run_chains(starved) == plain
    assert not starved.kv.entries and starved.cache_stats["reused_tokens"] > 0  # shared prefixes only


def test_one_at_a_time_with_the_cache_equals_batched(model_and_tokenizer):
    model, tok = model_and_tokenizer
    assert _run_chains(LocalBackend(model, tok, batch_size=1)) == _run_chains(LocalBackend(model, tok, batch_size=3))


def test_buffer_layer_writes_in_place_and_falls_back_when_full():
    layer = buffer_layer()(capacity=3)
    a, b, c = (torch.randn(2, 1, n, 4) for n in (2, 1, 2))
    keys, _ = layer.update(a, a)
    storage = keys.untyped_storage().data_ptr()
    keys, values = layer.update(b, b)
    assert keys.untyped_storage().data_ptr() == storage  # written into the same tensor
    assert torch.equal(keys, torch.cat([a, b], dim=2)) and layer.get_seq_length() == 3
    keys, _ = layer.update(c, c)  # no room left: concatenates, like transformers' own layer
    assert torch.equal(keys, torch.cat([a, b, c], dim=2)) and layer.get_seq_length() == 5


def test_grouped_head_attention_gives_the_same_logits_on_a_padded_batch():
    model, tok = tiny_model(seed=5)
    ids = torch.randint(10, 1000, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :2] = 0
    with torch.inference_mode():
        before = model(input_ids=ids, attention_mask=mask).logits
        use_gqa_sdpa(model)
        assert model.config._attn_implementation == "fclib_gqa_sdpa"
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(before[mask.bool()], after[mask.bool()], atol=1e-5)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix((1, 2), [1, 2]) == 2


def _held(backend: LocalBackend) -> int:
    """Row positions of the tensors the cache's conversations keep alive (each counted once)."""
    held: dict[int, int] = {}
    for entry in backend.kv.entries.values():
        held.update(entry.storages())
    return sum(held.values())


def test_the_cache_keeps_each_conversations_own_positions_and_nothing_of_ended_or_one_off_ones(model_and_tokenizer):
    """It once kept whole padded batch tensors alive through views (6 GiB of 7.5 in notebook 02), and every
    conversation until the memory bound dropped it."""
    from fclib.agent import AgentConfig, run_chains
    from fclib.tasks import TASKS, fol

    model, tok = model_and_tokenizer
    backend = LocalBackend(model, tok, batch_size=2)
    _run_chains(backend)  # three conversations of different lengths, two rows a batch, three turns
    own = sum(len(e.ids) for e in backend.kv.entries.values())
    shared = max(len(prefix) for prefix in backend.kv.shared)
    assert own - 2 * shared <= _held(backend) <= own  # the shared system prompt is kept once, not per conversation

    backend.clear_cache()
    chains = run_chains(backend, TASKS, fol.generate(3, seed=5, nmax=4), AgentConfig(max_steps=2), progress=False)
    assert all(c.done for c in chains) and not backend.kv.entries  # forgotten as their chains ended

    once = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]
    backend.chat(once, GenerationSettings(max_tokens=4, remember=False))
    assert not backend.kv.entries
