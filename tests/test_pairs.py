"""Preference pairs: strategies, filters, the split, determinism, the chat template, DPOTrainer."""

from __future__ import annotations

import filecmp
import json
import math

import pytest

from fclib.chains import verified
from fclib.pairs import PairSettings, build_pairs, load_pairs, save_pairs
from fclib.settings import SettingsError
from fclib.tasks import fol, gsm8k, reference_script
from tests.helpers import fol_chains, scripted_chain


@pytest.fixture(scope="module")
def fol_problems():
    return fol.generate(12, seed=5, nmax=4, split="train")


@pytest.fixture(scope="module")
def records(fol_problems):
    return [r for p in fol_problems for r in fol_chains(p)]


def test_labels_and_the_all_strategy(records, fol_problems):
    by = {(r["problem_id"], r["source"], r["sample"]): r for r in records}
    p = fol_problems[0]
    assert verified(by[(p.id, "teacher", 0)]) and not verified(by[(p.id, "teacher", 2)])
    assert by[(p.id, "teacher", 2)]["answer_correct"] and by[(p.id, "teacher", 2)]["outcome"] == "wrong_answer"

    pairs = build_pairs(records, strategy="all", max_pairs_per_problem=3, validation_share=0.25)
    everything = pairs.train + pairs.validation
    # 2 chosen x 2 rejected, but the two chosen chains are identical: 2 distinct pairs per problem
    assert len(everything) == 2 * len(fol_problems)
    assert pairs.stats["dropped"]["duplicate pair"] == 2 * len(fol_problems)
    for pair in everything:
        source = by[(pair["problem_id"], "teacher", pair["chosen_sample"])]
        assert pair["prompt"] == source["messages"][: source["n_prompt"]]  # exactly what the agent sent
        assert pair["chosen"][-1]["role"] == pair["rejected"][-1]["role"] == "assistant"
        assert pair["chosen"][-1]["content"].startswith("answer(")
        assert pair["chosen_source"] == "teacher" and pair["rejected_sample"] in (2, 3)
    assert pairs.stats["per_task"]["fol"]["pair_yield"] == 1.0


def test_random_and_first_divergence(records, fol_problems):
    random_pairs = build_pairs(records, strategy="random", validation_share=0)
    assert len(random_pairs.train) == len(fol_problems) and not random_pairs.validation

    step = build_pairs(records, strategy="first_divergence", max_pairs_per_problem=4, validation_share=0)
    by = {(r["problem_id"], r["source"], r["sample"]): r for r in records}
    for pair in step.train:
        assert len(pair["chosen"]) == len(pair["rejected"]) == 1
        assert pair["chosen"][0]["role"] == "assistant" and pair["chosen"] != pair["rejected"]
        source = by[(pair["problem_id"], "teacher", pair["chosen_sample"])]
        n = source["n_prompt"] + pair["step"]
        assert pair["prompt"] == source["messages"][:n] and pair["chosen"][0] == source["messages"][n]
    # Both rejected chains start with the reference's first call: they diverge at the second turn.
    assert {pair["step"] for pair in step.train} == {2}
    assert step.stats["dropped"]["duplicate pair"] > 0  # the two verified chains are identical


def test_reference_as_chosen_only_when_asked(fol_problems):
    p = fol_problems[0]
    ref = reference_script(p)
    records = [scripted_chain(p, [ref[0], "look()", "look()"], 0), scripted_chain(p, ref, 0, source="reference")]
    assert build_pairs(records, strategy="all", use_reference=False).stats["train_pairs"] == 0
    with_ref = build_pairs(records, strategy="all", use_reference=True, validation_share=0)
    assert [pair["chosen_source"] for pair in with_ref.train] == ["reference"]
    assert with_ref.stats["per_task"]["fol"]["chosen_from_reference"] == 1


def test_an_unverified_correct_gsm8k_chain_is_not_chosen(gsm8k_dir):
    p = next(p for p in gsm8k.load("train", gsm8k_dir)[:20] if len(reference_script(p)) > 2)
    typed = scripted_chain(p, [f"final_answer(value={p.answer})"], 0)
    assert typed["outcome"] == "correct" and not verified(typed)
    wrong = scripted_chain(p, [reference_script(p)[0], "final_answer(value=-1)"], 1)
    pairs = build_pairs([typed, wrong], strategy="all")
    assert pairs.stats["train_pairs"] == 0
    assert pairs.stats["dropped"]["correct but not verified (not used as chosen)"] == 1


def test_split_by_problem_is_deterministic_and_byte_identical(records, tmp_path):
    a = build_pairs(records, strategy="all", validation_share=0.3, seed=3)
    b = build_pairs(list(reversed(records)), strategy="all", validation_share=0.3, seed=3)
    assert not {p["problem_id"] for p in a.train} & {p["problem_id"] for p in a.validation}
    assert a.validation and a.stats["validation_problems"] == round(0.3 * 12)
    save_pairs(a, tmp_path / "a", run_name="t")
    save_pairs(b, tmp_path / "b", run_name="t")
    for name in ("train.jsonl", "validation.jsonl", "stats.json", "README.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    cmp = filecmp.dircmp(tmp_path / "a" / "dataset" / "train", tmp_path / "b" / "dataset" / "train")
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    other = build_pairs(records, strategy="all", validation_share=0.3, seed=4)
    assert {p["problem_id"] for p in other.validation} != {p["problem_id"] for p in a.validation}
    loaded = load_pairs(tmp_path / "a")
    assert loaded["train"].num_rows == len(a.train) and loaded["validation"].num_rows == len(a.validation)


def test_rendered_with_the_student_template_every_turn_survives(records):
    from fclib.models import load_tokenizer

    tok = load_tokenizer("embedded")
    for strategy in ("all", "first_divergence"):
        pairs = build_pairs(records, strategy=strategy, validation_share=0, tokenizer=tok)
        for pair in pairs.train[:6]:
            prompt = tok.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
            for side in ("chosen", "rejected"):
                full = tok.apply_chat_template(pair["prompt"] + pair[side], tokenize=False)
                assert full.startswith(prompt)
                completion = full[len(prompt) :]
                for m in pair[side]:
                    assert m["content"] in completion  # every call and every result turn
                assert pair[f"{side}_tokens"] > 0
    short = build_pairs(records, strategy="all", tokenizer=tok, max_length=100)
    assert short.stats["train_pairs"] == 0 and short.stats["dropped"]["longer than max_length=100 tokens"] > 0


def test_bad_input_is_refused(records):
    with pytest.raises(ValueError, match="strategy must be one of"):
        build_pairs(records, strategy="best")
    with pytest.raises(ValueError, match="no chains"):
        build_pairs([])
    with pytest.raises(ValueError, match="lack"):
        build_pairs([{"problem_id": "x"}])
    with pytest.raises(ValueError, match="tokenizer"):
        build_pairs(records, max_length=10)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["text", "native"])
def test_dpo_trainer_accepts_the_saved_dataset(records, fol_problems, tmp_path, protocol):
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from fclib.models import tiny_model

    if protocol == "native":  # each pair carries its tools schemas, which TRL renders into the prompt
        schemas = {p.id: fol.toolset(p).openai_tools() for p in fol_problems}
        records = [{**r, "tools": schemas[r["problem_id"]]} for r in records]
    save_pairs(build_pairs(records, strategy="first_divergence", validation_share=0.25), tmp_path / "pairs")
    data = load_pairs(tmp_path / "pairs")
    model, tok = tiny_model()  # a fresh one: PEFT wraps the model in place
    args = DPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=2,
        bf16=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tok,
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    result = trainer.train()
    assert result.global_step == 1 and math.isfinite(result.training_loss)
    assert json.dumps(trainer.state.log_history)  # serialisable


def test_tools_are_stored_as_each_pairs_own_list_of_schemas(records, fol_problems, tmp_path):
    schemas = {p.id: fol.toolset(p).openai_tools() for p in fol_problems}
    for p in fol_problems[1::2]:  # another toolset for half the problems: other functions and parameters
        schemas[p.id] = gsm8k.TOOLSET.openai_tools()
    native = [{**r, "tools": schemas[r["problem_id"]]} for r in records]
    save_pairs(build_pairs(native, strategy="first_divergence", validation_share=0.25), tmp_path / "pairs")
    for name in ("train", "validation"):
        rows = [json.loads(line) for line in (tmp_path / "pairs" / f"{name}.jsonl").read_text().splitlines()]
        assert rows and all(row["tools"] == schemas[row["problem_id"]] for row in rows)  # a list, not JSON text
    data = load_pairs(tmp_path / "pairs")
    assert {row["problem_id"] for row in data["train"]} & {p.id for p in fol_problems[1::2]}
    for split in data.values():  # each row its own schemas: no field of the other toolset, no None
        assert all(row["tools"] == schemas[row["problem_id"]] for row in split)
    # pair files of older runs hold the schemas as JSON text: read the same
    (tmp_path / "old").mkdir()
    rows = [json.loads(line) for line in (tmp_path / "pairs" / "train.jsonl").read_text().splitlines()]
    text = "".join(json.dumps({**row, "tools": json.dumps(row["tools"])}) + "\n" for row in rows)
    (tmp_path / "old" / "train.jsonl").write_text(text)
    assert [row["tools"] for row in load_pairs(tmp_path / "old")["train"]] == [row["tools"] for row in rows]


def test_step_pairs_take_the_reference_turn_against_a_failed_reply():
    p = fol.generate(1, seed=0, nmax=4)[0]
    ref = scripted_chain(p, reference_script(p), 0, source="reference")
    bad = scripted_chain(p, [reference_script(p)[0], "look()", "look()"], 0)  # whole chain: diverges at step 1

    def step(turn, sample, text, verdict):
        return {
            "source": "teacher",
            "problem_id": p.id,
            "task": "fol",
            "sample": sample,
            "reference_source": "reference",
            "reference_sample": 0,
            "turn": turn,
            "step": (turn - ref["n_prompt"]) // 2,
            "text": text,
            "verdict": verdict,
        }

    n = ref["n_prompt"]
    steps = [
        step(n + 4, 0, "answer(value=False)", "wrong_answer"),
        step(n, 1, "answer(value=True)", "other_function"),
        step(n + 2, 2, "exists(values=[True, False, False])", "same"),
        step(n + 2, 3, "exists(values=[True])", "same_function"),
    ]
    pairs = build_pairs([ref, bad], strategy="first_divergence", use_reference=True, validation_share=0, steps=steps)
    by_strategy = {(q["strategy"], q["call"]): q for q in pairs.train}
    assert set(by_strategy) == {
        ("first_divergence", 2),
        ("step", 3),
        ("step", 1),
    }  # 'same' and 'same_function' are no pairs
    last = by_strategy[("step", 3)]
    assert last["prompt"] == ref["messages"][: n + 4] and last["chosen"] == [ref["messages"][n + 4]]
    assert last["rejected"] == [{"role": "assistant", "content": "answer(value=False)"}]
    assert (last["rejected_source"], last["rejected_outcome"], last["chosen_source"]) == (
        "teacher-step",
        "wrong_answer",
        "reference",
    )
    assert pairs.stats["step_pairs"] == 2 and pairs.stats["train_pairs_by_call"] == {"1": 1, "2": 1, "3": 1}
    # step pairs alone make a problem usable, and share the cap with the whole-chain pairs
    assert len(build_pairs([ref], use_reference=True, validation_share=0, steps=steps).train) == 2
    assert (
        len(build_pairs([ref, bad], max_pairs_per_problem=2, use_reference=True, validation_share=0, steps=steps).train)
        == 2
    )
    # pair_kinds, for ablations: whole-chain pairs only, or step pairs only
    common = {"strategy": "first_divergence", "use_reference": True, "validation_share": 0, "steps": steps}
    only_chains = build_pairs([ref, bad], kinds=["chains"], **common)
    only_steps = build_pairs([ref, bad], kinds=["steps"], **common)
    assert [(q["strategy"], q["call"]) for q in only_chains.train] == [("first_divergence", 2)]
    assert sorted((q["strategy"], q["call"]) for q in only_steps.train) == [("step", 1), ("step", 3)]
    assert only_steps.stats["kinds"] == ["steps"] and pairs.stats["kinds"] == ["chains", "steps"]
    with pytest.raises(ValueError, match="kinds"):
        build_pairs([ref, bad], kinds=[], **common)
    with pytest.raises(SettingsError, match="pair_kinds"):
        PairSettings(pair_kinds=["chain"])
