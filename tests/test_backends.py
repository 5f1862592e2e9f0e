"""The local backend: batching with left padding, stop strings, seeded sampling, token limits."""

import pytest

from fclib.backends import GenerationSettings
from fclib.backends.local import LocalBackend
from fclib.backends.scripted import ScriptedBackend

CONVS = [
    [{"role": "user", "content": "Hello there, how are you today?"}],
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Count to three, please, slowly and clearly."},
    ],
]


@pytest.fixture(scope="module")
def backend(tiny):
    model, tokenizer = tiny
    return LocalBackend(model, tokenizer, model_id="tiny", batch_size=8)


def test_prompts_use_the_tokenizers_chat_template(backend):
    text = backend.render(CONVS[2])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    assert backend.count_tokens(CONVS[1]) > 3


def test_batched_greedy_equals_one_at_a_time(backend):
    settings = GenerationSettings(max_tokens=12)
    backend.batch_size = 8
    batched = backend.chat(CONVS, settings)
    backend.batch_size = 1
    single = backend.chat(CONVS, settings)
    backend.batch_size = 8
    assert [r.text for r in batched] == [r.text for r in single]
    assert [r.prompt_tokens for r in batched] == [r.prompt_tokens for r in single]
    assert all(r.completion_tokens <= 12 for r in batched)


def test_seeded_sampling_is_reproducible_and_seed_dependent(backend):
    a = backend.chat(CONVS, GenerationSettings(max_tokens=16, temperature=1.0, seed=1))
    b = backend.chat(CONVS, GenerationSettings(max_tokens=16, temperature=1.0, seed=1))
    c = backend.chat(CONVS, GenerationSettings(max_tokens=16, temperature=1.0, seed=2))
    assert [r.text for r in a] == [r.text for r in b]
    assert [r.text for r in a] != [r.text for r in c]


def test_per_conversation_seeds_make_samples_independent_of_the_batch(backend):
    settings = GenerationSettings(max_tokens=16, temperature=1.0, seeds=(11, 12, 13))
    together = [r.text for r in backend.chat(CONVS, settings)]
    backend.batch_size = 1
    alone = [r.text for r in backend.chat(CONVS, settings)]
    backend.batch_size = 8
    reordered = backend.chat(CONVS[::-1], GenerationSettings(max_tokens=16, temperature=1.0, seeds=(13, 12, 11)))
    assert together == alone == [r.text for r in reordered][::-1]
    other = backend.chat(CONVS, GenerationSettings(max_tokens=16, temperature=1.0, seeds=(21, 22, 23)))
    assert together != [r.text for r in other]


def test_row_sampler_draws_from_the_tempered_nucleus():
    import torch

    from fclib.backends.local import RowSampler

    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = (scores / 0.5).softmax(-1)[0]
    sampler = RowSampler([7], temperature=0.5)
    counts = torch.bincount(torch.stack([sampler(None, scores).argmax() for _ in range(4000)]), minlength=4)
    assert torch.allclose(counts / 4000, probs, atol=0.03)
    nucleus = RowSampler([7], temperature=1.0, top_p=0.7)  # p = .64, .24, .09, .03: the first two make 0.7
    picked = {int(nucleus(None, scores).argmax()) for _ in range(500)}
    assert picked == {0, 1}


def test_max_tokens_and_finish_reason(backend):
    replies = backend.chat(CONVS, GenerationSettings(max_tokens=5, extra={"min_new_tokens": 5}))
    assert all(r.completion_tokens == 5 and r.finish_reason == "length" for r in replies)


def test_stop_strings_cut_the_reply(backend):
    sampled = GenerationSettings(max_tokens=24, temperature=1.0, seed=3, extra={"min_new_tokens": 24})
    free = backend.chat(CONVS[:1], sampled)[0].text
    words = [w for w in free.split() if len(w) >= 3]
    assert words, free
    stop = words[len(words) // 2]
    sampled.stop = (stop,)
    cut = backend.chat(CONVS[:1], sampled)[0]
    assert stop not in cut.text and free.startswith(cut.text) and len(cut.text) < len(free)
    assert cut.finish_reason == "stop"


def test_scripted_backend_follows_its_script():
    b = ScriptedBackend({"Q?": ["a()", "b()"]})
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "Q?"}]
    assert b.chat([conv], GenerationSettings())[0].text == "a()"
    conv += [{"role": "assistant", "content": "a()"}, {"role": "user", "content": "Result: 1"}]
    assert b.chat([conv], GenerationSettings())[0].text == "b()"
    with pytest.raises(KeyError):
        b.chat([[{"role": "user", "content": "other"}]], GenerationSettings())
