"""LoRA + DPO training on the tiny model: it learns, saves, reloads, merges and resumes."""

from __future__ import annotations

import contextlib
import copy
import json
import math
from pathlib import Path

import pytest
import torch

from fclib.pairs import PairSet, build_pairs, save_pairs
from fclib.tasks import fol
from fclib.train import TrainSettings, last_checkpoint, load_student, merge_and_save, policy_margins, train
from tests.helpers import fol_chains

FAST = dict(student="tiny", batch_size=2, max_length=1024, learning_rate=5e-3, save_steps=2, eval_steps=2, lora_r=4)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    records = [r for p in fol.generate(6, seed=2, nmax=4, split="train") for r in fol_chains(p)]
    folder = tmp_path_factory.mktemp("pairs")
    save_pairs(build_pairs(records, strategy="first_divergence", validation_share=0.34), folder)
    return folder


@pytest.fixture(scope="module")
def trained(pairs_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    info = train(pairs_dir, run, TrainSettings(max_steps=4, **FAST))
    return run, info


@pytest.mark.slow
def test_training_learns_and_writes_its_outputs(trained):
    run, info = trained
    assert info["global_step"] == 4 and math.isfinite(info["training_loss"])
    assert info["quantized_4bit"] == torch.cuda.is_available()  # quantization 'auto': 4-bit where CUDA is
    assert 0 < info["trainable_parameters"]["trainable"] < info["trainable_parameters"]["total"]
    adapter = run / "model" / "adapter"
    from safetensors.torch import load_file

    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and all(float(w.abs().max()) > 0 for w in lora_b)  # initialised to zero, moved by training
    assert (adapter / "tokenizer_config.json").is_file()
    saved = json.loads((adapter / "fclib_training.json").read_text())
    assert saved["settings"]["student"] == "tiny" and saved["settings"]["loss_type"] == ["sigmoid", "sft"]
    assert json.loads((adapter / "dpo_config.json").read_text())["beta"] == 0.1
    log = json.loads((run / "train" / "log_history.json").read_text())
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4]
    assert any("eval_rewards/margins" in e for e in log)
    assert last_checkpoint(run).endswith("checkpoint-4")


@pytest.mark.slow
def test_reload_and_merge_give_the_same_logits(trained, tmp_path):
    run, _ = trained
    adapter = run / "model" / "adapter"
    model, tok = load_student(adapter)
    merged_dir = merge_and_save(adapter, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    x = tok("holds(predicate='red', individual='a')", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        a, b = model(input_ids=x).logits, merged(input_ids=x).logits
        with model.disable_adapter():
            base = model(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, base, atol=1e-4)  # the adapter does something


def test_completion_logps_match_one_forward_per_sequence(tiny, pairs_dir):
    from fclib.pairs import load_pairs
    from fclib.train import completion_logps

    model, tok = tiny
    pairs = list(load_pairs(pairs_dir)["train"])[:3]
    items = [(p["prompt"], p[side], None) for p in pairs for side in ("chosen", "rejected")]
    expected = []
    for prompt, completion, _ in items:
        head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tok(tok.apply_chat_template(prompt + completion, tokenize=False), add_special_tokens=False)["input_ids"]
        start = len(tok(head, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0, :-1].float(), -1)
        expected.append(float(logps[start - 1 :].gather(1, torch.tensor(full[start:])[:, None]).sum()))
    assert completion_logps(model, tok, items) == pytest.approx(expected, abs=1e-3)


@pytest.mark.slow
def test_margins_rise_on_the_training_pairs(trained, pairs_dir):
    from fclib.pairs import load_pairs

    run, _ = trained
    model, tok = load_student(run / "model" / "adapter")
    pairs = list(load_pairs(pairs_dir)["train"])[:4]
    after = policy_margins(model, tok, pairs)
    with model.disable_adapter():
        before = policy_margins(model, tok, pairs)
    assert sum(after) > sum(before)


class _StopAt:
    """A callback that kills the training (as a kill would, with an exception) once checkpoint `step` is saved."""

    def __init__(self, step: int):
        from transformers import TrainerCallback

        stop = step

        class Callback(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == stop:
                    raise KeyboardInterrupt(f"stopped after checkpoint {stop}")

        self.callback = Callback()


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "model" / "adapter" / "adapter_model.safetensors")


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_an_interrupted_training_resumes_to_the_adapter_of_an_uninterrupted_one(trained, pairs_dir, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(pairs_dir, tmp_path, TrainSettings(max_steps=4, **FAST), callbacks=[_StopAt(2).callback])
    assert last_checkpoint(tmp_path).endswith("checkpoint-2") and not (tmp_path / "model" / "adapter").exists()
    info = train(pairs_dir, tmp_path, TrainSettings(max_steps=4, **FAST))
    assert info["resumed_from"].endswith("checkpoint-2") and info["global_step"] == 4
    log = json.loads((tmp_path / "train" / "log_history.json").read_text())
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4]
    assert _same_weights(tmp_path, trained[0])


@pytest.mark.slow
def test_a_finished_training_is_recognised_and_not_repeated(trained, pairs_dir):
    run, first = trained
    before = {p: p.stat().st_mtime_ns for p in (run / "model").rglob("*.safetensors")}
    again = train(pairs_dir, run, TrainSettings(max_steps=4, **{**FAST, "merge_adapter": True}))
    assert again["reused"] and again["global_step"] == 4 and again["training_loss"] == first["training_loss"]
    assert {p: p.stat().st_mtime_ns for p in (run / "model").rglob("*.safetensors")} == before  # nothing written
    record = json.loads((run / "model" / "adapter" / "fclib_training.json").read_text())
    assert record["settings"]["merge_adapter"] is True  # a setting that leaves the weights as they are follows


@pytest.mark.slow
def test_a_checkpoint_at_the_last_step_is_the_result_without_another_step(pairs_dir, tmp_path):
    """Killed after the last step, before the adapter was saved: the last checkpoint is the result. Resumed there
    in the middle of an epoch, the Trainer took one step more (a third of two)."""
    import shutil

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    first = train(pairs_dir, whole, TrainSettings(max_steps=2, **FAST))
    shutil.copytree(whole / "model" / "checkpoints", killed / "model" / "checkpoints")
    info = train(pairs_dir, killed, TrainSettings(max_steps=2, **FAST))
    assert info["global_step"] == 2 and info["resumed_from"].endswith("checkpoint-2")
    assert _same_weights(killed, whole)
    log = json.loads((killed / "train" / "log_history.json").read_text())
    assert [e["step"] for e in log if "loss" in e] == [1, 2]
    assert info["trainable_parameters"] == first["trainable_parameters"]
    assert info["training_loss"] == pytest.approx(first["training_loss"], rel=1e-3)  # the mean of the logged losses


@pytest.mark.slow
def test_checkpoints_of_other_settings_or_pairs_or_cut_short_are_set_aside(trained, pairs_dir, tmp_path):
    import shutil

    with pytest.raises(KeyboardInterrupt):
        train(pairs_dir, tmp_path, TrainSettings(max_steps=4, **FAST), callbacks=[_StopAt(2).callback])
    (tmp_path / "model" / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text('{"global_st')  # cut
    info = train(pairs_dir, tmp_path, TrainSettings(max_steps=4, **FAST))
    assert info["resumed_from"] is None and _same_weights(tmp_path, trained[0])  # afresh, to the same adapter
    assert [p.name.split("-20")[0] for p in (tmp_path / "model" / "set-aside").iterdir()] == ["checkpoint-2"]

    changed = TrainSettings(max_steps=4, **{**FAST, "learning_rate": 1e-3})
    info = train(pairs_dir, tmp_path, changed)
    assert info["resumed_from"] is None and not info.get("reused")  # neither resumed nor taken as finished
    record = json.loads((tmp_path / "model" / "adapter" / "fclib_training.json").read_text())
    assert record["settings"]["learning_rate"] == 1e-3 and record["fingerprint"]["settings"]["learning_rate"] == 1e-3
    assert not _same_weights(tmp_path, trained[0])
    assert any(p.name.startswith("checkpoints-") for p in (tmp_path / "model" / "set-aside").iterdir())

    other_pairs = tmp_path / "other-pairs"
    shutil.copytree(pairs_dir, other_pairs)
    rows = (other_pairs / "train.jsonl").read_text().splitlines(keepends=True)
    (other_pairs / "train.jsonl").write_text("".join(rows[:-1]))  # one pair fewer
    info = train(other_pairs, tmp_path, changed)
    assert info["resumed_from"] is None and not info.get("reused")


def test_clear_errors(pairs_dir, tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU.*quantization='none'"):
            train(pairs_dir, tmp_path, TrainSettings(quantization="4bit", **FAST))
    with pytest.raises(ValueError, match="student: '.*no-model' is not a folder"):  # before anything loads
        TrainSettings(**{**FAST, "student": str(tmp_path / "no-model")})
    with pytest.raises(ValueError, match="neither 'embedded', 'tiny', a local folder nor a hub id"):
        TrainSettings(**{**FAST, "student": "x y"})
    with pytest.raises(ValueError, match=r"lora_dropout is a probability in \[0, 1\), not 2"):
        TrainSettings(**{**FAST, "lora_dropout": 2})
    with pytest.raises(ValueError, match="shorter than the longest prompt"):
        train(pairs_dir, tmp_path, TrainSettings(**{**FAST, "max_length": 64}))
    empty = tmp_path / "empty"
    save_pairs(PairSet([], [], build_pairs([fol_chains(fol.generate(1, seed=0, nmax=4)[0])[3]]).stats), empty)
    with pytest.raises(ValueError, match="no training pairs"):
        train(empty, tmp_path, TrainSettings(**FAST))
    with pytest.raises(FileNotFoundError, match="run notebook 03"):
        train(tmp_path / "nothing", tmp_path, TrainSettings(**FAST))
    with pytest.raises(ValueError, match="quantization must be one of"):
        TrainSettings(quantization="8bit")
    with pytest.raises(ValueError, match="eval_steps must be >= 0"):
        TrainSettings(eval_steps=-1)


def test_eval_steps_zero_turns_validation_off(tmp_path):
    from fclib.train import dpo_config

    assert dpo_config(TrainSettings(eval_steps=0), tmp_path, False, has_eval=True).eval_strategy == "no"
    assert dpo_config(TrainSettings(eval_steps=5), tmp_path, False, has_eval=True).eval_strategy == "steps"
    assert dpo_config(TrainSettings(eval_steps=5), tmp_path, False, has_eval=False).eval_strategy == "no"


def test_the_training_config_uses_no_deprecated_argument(tmp_path):
    """Notebook 04's output carries no FutureWarning of fclib's own making (it once passed `gradient_checkpointing`)."""
    import warnings

    from fclib.train import dpo_config

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = dpo_config(TrainSettings(), tmp_path, False, has_eval=False)
    # TRL still reads the old name, which mirrors the new one
    assert args.activation_checkpointing is False and args.gradient_checkpointing is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_4bit_on_cuda(pairs_dir, tmp_path):
    info = train(pairs_dir, tmp_path, TrainSettings(quantization="4bit", max_steps=2, **FAST))
    assert info["quantized_4bit"] and math.isfinite(info["training_loss"])


@pytest.mark.slow
def test_completion_only_scoring_gives_the_same_loss_and_gradients(pairs_dir, tmp_path):
    from fclib.fast.completion_scoring import completion_only_scoring
    from fclib.train import make_trainer

    results = []
    for compact in (False, True):
        settings = TrainSettings(**{**FAST, "max_steps": 1})
        if compact:
            with completion_only_scoring():
                trainer = make_trainer(pairs_dir, tmp_path, settings)
                batch = next(iter(trainer.get_train_dataloader()))
                loss = trainer.compute_loss(trainer.model, batch)
        else:
            trainer = make_trainer(pairs_dir, tmp_path, settings)
            batch = next(iter(trainer.get_train_dataloader()))
            loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((float(loss), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert grads_a and loss_a == pytest.approx(loss_b, rel=1e-6)
    for name, g in grads_a.items():
        assert torch.allclose(g, grads_b[name], atol=1e-6), name


def test_shared_prompt_prefix_groups_rows_and_skips_padding(tiny):
    from fclib.fast.prefix_sharing import shared_prompt_prefix

    model, _ = tiny
    backbone = model.base_model
    g = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(10, model.config.vocab_size, (n,), generator=g)

    a, b, p = tokens(80), tokens(90), tokens(30)  # two tasks' prefixes, one pair's prompt; row 4 shares nothing
    rows = [
        torch.cat([a, tokens(20)]),
        torch.cat([b, tokens(15)]),
        torch.cat([a, tokens(30)]),
        torch.cat([b, tokens(5)]),
        tokens(40),
        torch.cat([a, p]),
        torch.cat([a, p, tokens(2)]),
    ]  # row 5 is a prefix of row 6
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([r, torch.zeros(width - len(r), dtype=torch.long)]) for r in rows])
    mask = torch.stack([(torch.arange(width) < len(r)).long() for r in rows])
    results, calls = [], []
    hook = backbone.embed_tokens.register_forward_pre_hook(lambda m, a: calls.append(tuple(a[0].shape)))
    for share in (False, True):
        model.zero_grad()
        with shared_prompt_prefix(model) if share else contextlib.nullcontext():
            hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        assert hidden.shape == (7, width, model.config.hidden_size)
        hidden[mask.bool()].pow(2).sum().backward()
        results.append(
            (hidden[mask.bool()].detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
        )
    hook.remove()
    # task a's prefix, then the pair's prompt once (but the last token of row 5) and the rest of both rows, then a's
    # other rows; task b; row 4 alone
    assert calls == [(7, width), (1, 80), (1, 29), (2, 3), (2, 30), (1, 90), (2, 15), (1, 40)]
    (hidden_a, grads_a), (hidden_b, grads_b) = results
    assert torch.allclose(hidden_a, hidden_b, atol=1e-5)
    # the shared prefix's gradient is summed in another order: a few 1e-4 of a unit where contributions cancel
    assert grads_a and all(torch.allclose(x, y, atol=1e-4, rtol=1e-3) for x, y in zip(grads_a, grads_b, strict=True))


def test_shared_prompt_prefix_reuses_the_frozen_base_prefix_only(tiny):
    from peft import LoraConfig, get_peft_model

    from fclib.fast.prefix_sharing import shared_prompt_prefix

    base, _ = tiny
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    backbone = model.get_base_model().base_model
    g = torch.Generator().manual_seed(1)

    def tokens(n):
        return torch.randint(10, model.config.vocab_size, (n,), generator=g)

    a = tokens(80)
    batches = [torch.stack([torch.cat([a, tokens(20)]) for _ in range(3)]) for _ in range(3)]
    calls = []
    hook = backbone.embed_tokens.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    plain = []
    with torch.no_grad():
        with model.disable_adapter():
            plain += [backbone(input_ids=ids).last_hidden_state for ids in batches[:2]]
        plain.append(backbone(input_ids=batches[2]).last_hidden_state)
        calls.clear()
        with shared_prompt_prefix(model):
            with model.disable_adapter():  # the reference pass: the prefix once for both batches
                shared = [backbone(input_ids=ids).last_hidden_state for ids in batches[:2]]
            shared.append(backbone(input_ids=batches[2]).last_hidden_state)  # the adapter on: computed again
    hook.remove()
    assert calls == [(1, 80), (3, 20), (3, 20), (1, 80), (3, 20)]
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(plain, shared, strict=True))
    assert not torch.allclose(plain[0][:, :80], plain[2][:, :80], atol=1e-3), "the adapter should change the prefix"


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads resident memory from /proc")
def test_release_memory_hands_freed_heap_back(tmp_path):
    """What training frees stays resident in glibc's heap until trimmed; `release_memory` (called at the end of
    `train`) hands it back. Here 300 tensors of 1 MiB, of which the last stays alive so the heap's top is busy."""
    import ctypes

    from fclib.train import release_memory

    try:
        assert callable(ctypes.CDLL("libc.so.6").malloc_trim)
    except (OSError, AttributeError):
        pytest.skip("not glibc")

    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    warm = torch.ones(2**20)
    del warm  # a freed 4 MiB block raises glibc's mmap threshold above the blocks that follow
    blocks = [torch.ones(2**18) for _ in range(300)]  # 1 MiB each, in the heap
    last = blocks.pop()
    before = resident()
    del blocks
    held = resident()
    release_memory()
    after = resident()
    assert float(last[0]) == 1.0
    assert before - after > 200 * 2**20, (before, held, after)


@pytest.mark.slow
def test_bf16_training_changes_the_loss_and_gradients_within_bounds(pairs_dir, tmp_path):
    """`train_precision='bf16'` (a switch, not exact) holds the frozen base in bf16 and the adapter in fp32, and
    moves one step's loss by under 0.1% and its gradients by under 3% of their norm (cosine above 0.9995)
    against fp32 (measured on this tiny model: 1e-5 and 0.9%, cosine 0.99997)."""
    from fclib.fast.completion_scoring import completion_only_scoring
    from fclib.fast.prefix_sharing import shared_prompt_prefix
    from fclib.train import make_trainer

    results = {}
    for precision in ("fp32", "bf16"):
        settings = TrainSettings(**{**FAST, "max_steps": 1, "lora_dropout": 0.0, "precision": precision})
        with completion_only_scoring():
            trainer = make_trainer(pairs_dir, tmp_path, settings)
            frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
            assert frozen == {torch.bfloat16 if precision == "bf16" else torch.float32}
            assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
            batch = next(iter(trainer.get_train_dataloader()))
            with shared_prompt_prefix(trainer.model):
                loss = trainer.compute_loss(trainer.model, batch)
            loss.backward()
        grads = {n: p.grad.float().flatten() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results[precision] = (loss.item(), torch.cat([grads[n] for n in sorted(grads)]))
    (loss32, g32), (loss16, g16) = results["fp32"], results["bf16"]
    assert loss16 != loss32 and abs(loss16 - loss32) < 1e-3 * abs(loss32)
    assert float((g16 - g32).norm()) < 0.03 * float(g32.norm())
    assert float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)) > 0.9995


def _one_step(pairs_dir, tmp_path, contexts, train_mode=False):
    """One step's loss, its gradients and the bytes its forward pass keeps for backward, on a fresh trainer (tiny
    model, completion-only scoring, no dropout), computed inside the context managers `contexts(trainer)` gives."""
    from fclib.fast.completion_scoring import completion_only_scoring
    from fclib.train import make_trainer

    with completion_only_scoring():
        trainer = make_trainer(pairs_dir, tmp_path, TrainSettings(**{**FAST, "max_steps": 1, "lora_dropout": 0.0}))
        batch = next(iter(trainer.get_train_dataloader()))
        if train_mode:
            trainer.model.train()  # as in trainer.train()
        kept = {}

        def keep(t):
            if not isinstance(t, torch.nn.Parameter):
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with contextlib.ExitStack() as stack:
            for context in contexts(trainer):
                stack.enter_context(context)
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                loss = trainer.compute_loss(trainer.model, batch)
            loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.item(), grads, sum(kept.values())


@pytest.mark.slow
def test_grouped_kv_attention_gives_the_same_loss_and_gradients_and_keeps_less(pairs_dir, tmp_path):
    """With grouped key/value heads read in place (the tiny model has 2 for 4 query heads), one step's loss is the
    same to the last bit and its gradients to rounding, while the forward pass keeps fewer bytes for backward."""
    from fclib.fast.grouped_attention import grouped_kv_attention
    from fclib.fast.prefix_sharing import shared_prompt_prefix

    (loss_a, grads_a, kept_a), (loss_b, grads_b, kept_b) = (
        _one_step(
            pairs_dir,
            tmp_path,
            lambda trainer, grouped=grouped: [
                shared_prompt_prefix(trainer.model),
                grouped_kv_attention() if grouped else contextlib.nullcontext(),
            ],
        )
        for grouped in (False, True)
    )
    assert grads_a and loss_a == loss_b
    for name, g in grads_a.items():
        assert torch.allclose(g, grads_b[name], atol=1e-6, rtol=1e-5), name
    assert kept_b < 0.95 * kept_a, (kept_a, kept_b)


@pytest.mark.slow
def test_recomputed_layers_give_the_same_loss_and_gradients_and_keep_less(pairs_dir, tmp_path, monkeypatch):
    """Each decoder layer rerun in the backward pass, under prompt-prefix sharing (which hands the shared prefix to
    the rows through the cache the replay must not write twice): one step's loss and gradients are the same to the
    last bit, while the forward pass keeps a fraction of the bytes for backward."""
    from fclib.fast.prefix_sharing import PrefixSharing, shared_prompt_prefix
    from fclib.fast.recompute import recompute_layers

    shared = []
    original_shared = PrefixSharing.shared
    monkeypatch.setattr(PrefixSharing, "shared", lambda *a: shared.append(1) or original_shared(*a))
    results = []
    for recompute in (False, True):
        shared.clear()

        def contexts(trainer, recompute=recompute):
            return [
                shared_prompt_prefix(trainer.model),
                recompute_layers(trainer.model) if recompute else contextlib.nullcontext(),
            ]

        results.append((*_one_step(pairs_dir, tmp_path, contexts, train_mode=True), len(shared)))
    (loss_a, grads_a, kept_a, shared_a), (loss_b, grads_b, kept_b, shared_b) = results
    assert shared_a == shared_b > 0  # prefixes were shared both times
    assert grads_a and loss_a == loss_b and grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():
        assert torch.equal(g, grads_b[name]), name
    assert kept_b < 0.5 * kept_a, (kept_a, kept_b)


@pytest.mark.slow
def test_shared_prompt_prefix_gives_the_same_loss_and_gradients(pairs_dir, tmp_path):
    from fclib.fast.completion_scoring import completion_only_scoring
    from fclib.fast.prefix_sharing import shared_prompt_prefix
    from fclib.train import make_trainer

    with completion_only_scoring():
        trainer = make_trainer(
            pairs_dir, tmp_path, TrainSettings(**{**FAST, "max_steps": 1, "lora_dropout": 0.0, "quantization": "none"})
        )
        batch = next(iter(trainer.get_train_dataloader()))  # fp32 on every device, so the comparison can be exact
        ids = batch["input_ids"]
        shared = int(((ids == ids[:1]).all(0) & batch["attention_mask"].bool().all(0)).long().cumprod(0).sum())
        assert 64 <= shared < ids.size(1) - 1, "the batch should share a long prompt prefix"
        backbone = trainer.model.get_base_model().base_model
        results, calls = [], []
        for share in (False, True):
            trainer.model.zero_grad()
            original = backbone.forward
            with shared_prompt_prefix(trainer.model) if share else contextlib.nullcontext():
                hook = backbone.embed_tokens.register_forward_pre_hook(lambda m, a: calls.append(tuple(a[0].shape)))
                loss = trainer.compute_loss(trainer.model, batch)
                hook.remove()
            assert backbone.forward == original
            loss.backward()
            results.append(
                (float(loss), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
            )
    # without sharing: policy and reference each run the whole batch; with it, the task's prefix once (one row),
    # then each pair's prompt remainder once (one row), then the chosen and rejected completions (two rows)
    assert calls[:2] == [tuple(ids.shape)] * 2
    sharing = calls[2:]
    assert sharing[: len(sharing) // 2] == sharing[len(sharing) // 2 :], "policy and reference run alike"
    policy = sharing[: len(sharing) // 2]
    assert policy[0] == (1, shared)
    assert [rows for rows, _ in policy[1:]] == [1, 2] * (ids.size(0) // 2)
    assert sum(rows * n for rows, n in policy) < shared + ids.size(0) * (ids.size(1) - shared)
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert grads_a and loss_a == pytest.approx(loss_b, rel=1e-5)
    for name, g in grads_a.items():
        assert torch.allclose(g, grads_b[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.slow
def test_training_runs_alone_from_a_runs_parameters(pairs_dir, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    import yaml

    from fclib.pipeline import load_profile

    run = tmp_path / "r1"
    shutil.copytree(pairs_dir, run / "pairs")
    params = load_profile("smoke", {"run_name": "r1", "train_max_steps": 1, "train_batch_size": 2})
    (run / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "FCLIB_OUTPUTS": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "fclib.train", "--run-name", "r1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["global_step"] == 1
    assert (run / "model" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_train_one_adapter(pairs_dir, tmp_path):
    """Two gloo processes on this CPU: each trains on its shard, one adapter and one log are written.

    accelerate 1.15 starts several CPU processes only through `--multi_gpu` (its `--cpu` launcher
    runs one process unless given an mpirun hostfile); without CUDA those processes use gloo.
    """
    import os
    import shutil
    import subprocess
    import sys

    import yaml

    from fclib.pipeline import load_profile

    env = {**os.environ, "FCLIB_OUTPUTS": str(tmp_path), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    runs = {}
    for name, launcher in (
        ("one", [sys.executable, "-m", "fclib.train"]),
        (
            "two",
            [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2"]
            + ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fclib.train"],
        ),
    ):
        shutil.copytree(pairs_dir, tmp_path / name / "pairs")
        params = load_profile("smoke", {"run_name": name, "train_max_steps": 2, "train_batch_size": 2})
        (tmp_path / name / "params.yaml").write_text(yaml.safe_dump({**params, "eval_steps": 0}))
        proc = subprocess.run(
            [*launcher, "--run-name", name], env=env, capture_output=True, text=True, timeout=600, check=False
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"')]
        assert len(printed) == 1, proc.stdout  # the main process alone reports
        log = json.loads((tmp_path / name / "train" / "log_history.json").read_text())
        runs[name] = printed[0], [e for e in log if "loss" in e]
    (one, one_log), (two, two_log) = runs["one"], runs["two"]
    assert (one["processes"], two["processes"]) == (1, 2) and one["global_step"] == two["global_step"] == 2
    assert (tmp_path / "two" / "model" / "adapter" / "adapter_model.safetensors").is_file()
    assert two_log[0]["epoch"] == pytest.approx(2 * one_log[0]["epoch"], rel=0.35)  # each step saw 2 shards
    assert two_log[0]["loss"] == pytest.approx(one_log[0]["loss"], rel=0.05)  # the same model, other pairs
    assert two["training_loss"] == pytest.approx(one["training_loss"], rel=0.05)


@pytest.mark.slow
def test_the_training_speed_ups_can_be_switched_off(pairs_dir, tmp_path, monkeypatch):
    import fclib.train

    def refuse(*args, **kwargs):
        raise AssertionError("a speed-up ran although switched off")

    monkeypatch.setattr(fclib.train, "shared_prompt_prefix", refuse)
    monkeypatch.setattr(fclib.train, "completion_only_scoring", refuse)
    monkeypatch.setattr(fclib.train, "grouped_kv_attention", refuse)
    off = {"share_prompt_prefix": False, "completion_only_scoring": False, "grouped_kv_attention": False}
    plain = TrainSettings(**{**FAST, "max_steps": 1, **off})
    info = train(pairs_dir, tmp_path, plain)
    assert info["global_step"] == 1 and math.isfinite(info["training_loss"])
    assert info["settings"]["share_prompt_prefix"] is False


def test_the_evaluation_precision_follows_the_device_and_how_the_adapter_was_trained(tmp_path, monkeypatch):
    import torch

    import fclib.train
    from fclib.train import load_for_eval, resolve_precision

    qlora, lora = tmp_path / "qlora", tmp_path / "lora"
    for folder, four_bit in ((qlora, True), (lora, False)):
        folder.mkdir()
        (folder / "fclib_training.json").write_text(json.dumps({"quantized_4bit": four_bit}))
    monkeypatch.setattr(fclib.train, "_cuda", lambda: False)
    assert resolve_precision("auto", qlora) == resolve_precision("auto", lora) == "fp32"  # a CPU: as before
    monkeypatch.setattr(fclib.train, "_cuda", lambda: True)
    assert resolve_precision("auto", qlora) == "4bit" and resolve_precision("auto", lora) == "bf16"
    assert resolve_precision("auto") == "bf16" and resolve_precision("fp32", qlora) == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16")
    monkeypatch.setattr(fclib.train, "_cuda", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        load_for_eval("embedded", "4bit")
    model, _ = load_for_eval("embedded", "bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    (qlora / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="unmerged"):
        load_student(qlora, base="embedded", merge=True, precision="4bit")


@pytest.mark.slow
def test_a_served_dpo_student_gives_the_chains_of_the_in_process_one(trained, tmp_path):
    """The DPO student merged, saved, served by `transformers serve` on loopback and evaluated through
    the endpoint, as notebook 05 does with dpo_url: greedy, its chains are the in-process ones."""
    from fclib.agent import AgentConfig
    from fclib.backends.local import LocalBackend
    from fclib.backends.server import LocalServer
    from fclib.chains import generate
    from fclib.evaluate import EvalSettings
    from fclib.tasks import fol
    from fclib.teacher import TeacherSettings

    run, _ = trained
    adapter = run / "model" / "adapter"
    merged = merge_and_save(adapter, tmp_path / "merged", base="tiny")
    problems = fol.generate(2, seed=7, nmax=4, split="test")
    config = AgentConfig(max_steps=3, max_tokens_per_turn=12)  # greedy, as evaluation is
    in_process = LocalBackend(*load_student(adapter, base="tiny", merge=True), model_id="dpo", batch_size=2)
    here = generate(in_process, problems, tmp_path / "here.jsonl", k=1, config=config, source="dpo")
    with LocalServer(str(merged), log_path=tmp_path / "server.log") as server:
        settings = EvalSettings(dpo_url=server.base_url, dpo_model=server.model_dir)
        served = settings.served(settings.dpo_url, settings.dpo_model, TeacherSettings(concurrency=2))
        there = generate(served, problems, tmp_path / "there.jsonl", k=1, config=config, source="dpo")
    assert all(r["outcome"] != "error" for r in there), [r["reason"] for r in there]
    assert [r["messages"] for r in there] == [r["messages"] for r in here]
    assert [r["outcome"] for r in there] == [r["outcome"] for r in here]


def test_what_is_set_aside_twice_in_one_second_is_kept_twice(tmp_path):
    from fclib import checkpoints

    for content in ("first", "second"):
        (tmp_path / "model" / "checkpoints").mkdir(parents=True)
        (tmp_path / "model" / "checkpoints" / "note").write_text(content)
        checkpoints.set_aside_all(tmp_path / "model" / "checkpoints")
    kept = sorted((p / "note").read_text() for p in (tmp_path / "model" / "set-aside").iterdir())
    assert kept == ["first", "second"]
