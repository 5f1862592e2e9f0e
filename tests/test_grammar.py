"""Constrained decoding: a toolset's grammar admits exactly its well-formed calls, and a model decoding
under it writes nothing else."""

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fclib.agent import AgentConfig, run_chains
from fclib.backends import GenerationSettings, Reply
from fclib.backends.local import LocalBackend
from fclib.chains import fingerprint
from fclib.evaluate import EvalSettings, metrics, write_report
from fclib.protocol import format_call, parse_call
from fclib.settings import SettingsError
from fclib.tasks import TASKS, build_problems, replay_references
from fclib.teacher import TeacherSettings

llguidance = pytest.importorskip("llguidance")


@pytest.fixture(scope="module")
def problems(gsm8k_dir):
    train, test = build_problems(3, 4, 4, 3, 3, nmax=[4, 8], gsm8k_source=str(gsm8k_dir))
    return train + test


@pytest.fixture(scope="module")
def backend(tiny):
    model, tokenizer = tiny
    return LocalBackend(model, tokenizer, model_id="tiny", batch_size=8)


def accepts(backend, grammar: str, text: str) -> bool:
    """Whether `text`, then the end of the reply, is a string of the grammar."""
    tok = backend.tokenizer
    matcher = llguidance.LLMatcher(
        backend.grammar_tokenizer(), llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return matcher.consume_tokens(ids) and matcher.consume_token(tok.eos_token_id) and matcher.is_accepting()


def test_every_reference_call_is_in_its_toolsets_grammar(backend, problems):
    checked = 0
    for chain in replay_references(problems):
        problem = next(p for p in problems if p.id == chain.problem_id)
        grammar = TASKS[problem.task].toolset(problem).grammar()
        for m in chain.messages[chain.n_prompt :]:
            if m["role"] == "assistant":
                assert accepts(backend, grammar, m["content"]), m["content"]
                checked += 1
    assert checked > 30


@pytest.mark.parametrize(
    "text",
    [
        "answer(True)",  # positional: the grammar writes every argument by keyword
        "answer(value=1)",  # an integer where a boolean is declared
        "answer(value=True) ",  # anything after the call
        "Answer: answer(value=True)",  # anything before it
        "answer(value=True)answer(value=False)",  # two calls
        "holds(predicate='purple', individual='nobody')",  # not one of the choices
        "for_all(values=[True,False])",  # not as Python writes a list
        "for_all(values=True)",  # a boolean where a list is declared
        "logical_and(b=True, a=False)",  # not in declared order
        "print(value=True)",  # not a function of the toolset
        'truth_values(predicate="x")',
    ],
)
def test_the_grammar_refuses_what_is_not_one_well_formed_call(backend, problems, text):
    fol = next(p for p in problems if p.task == "fol")
    assert not accepts(backend, TASKS["fol"].toolset(fol).grammar(), text)


@pytest.mark.parametrize("text", ["add(a=007, b=1)", "add(a=1e5, b=1)", "final_answer(value='12')", "add(a=1, b=2"])
def test_the_gsm8k_grammar_refuses_numbers_python_would_not_read_or_the_declared_type_not(backend, problems, text):
    gsm = next(p for p in problems if p.task == "gsm8k")
    assert not accepts(backend, TASKS["gsm8k"].toolset(gsm).grammar(), text)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_call_with_literals_of_the_declared_types_is_in_the_grammar(backend, problems, data):
    problem = data.draw(st.sampled_from(problems))
    toolset = TASKS[problem.task].toolset(problem)
    f = data.draw(st.sampled_from(list(toolset)))
    kinds = {
        bool: st.booleans(),
        list: st.lists(st.booleans(), max_size=12),
        int: st.integers(-(10**6), 10**6),
        float: st.one_of(st.integers(-(10**6), 10**6), st.decimals(-1000, 1000, places=3).map(float)),
        str: st.text("abcdefgh xyz", max_size=10),
    }
    kwargs = {}
    for p in f.params:
        if p.choices is not None:
            kwargs[p.name] = data.draw(st.sampled_from(p.choices))
        else:
            types = p.type if isinstance(p.type, tuple) else (p.type,)
            kwargs[p.name] = data.draw(st.one_of(*(kinds[t] for t in types)))
    text = format_call(f.name, kwargs)
    assert accepts(backend, toolset.grammar(), text), text


def test_a_random_model_under_the_grammar_writes_only_well_formed_calls(backend, problems):
    """The tiny model has random weights: unconstrained, its replies are never calls; constrained, they all are."""
    prompts = [[{"role": "user", "content": p.question}] for p in problems[:8]]
    toolsets = [TASKS[p.task].toolset(p) for p in problems[:8]]
    free = GenerationSettings(max_tokens=120, temperature=1.0, seeds=tuple(range(8)))
    bound = replace(free, grammars=tuple(t.grammar() for t in toolsets))
    unconstrained = backend.chat(prompts, free)
    constrained = backend.chat(prompts, bound)
    assert sum(r.text.split("(")[0] in t.functions for r, t in zip(unconstrained, toolsets)) <= 1
    for reply, toolset in zip(constrained, toolsets):
        assert reply.finish_reason == "stop", reply.text
        call = parse_call(reply.text, known=set(toolset.functions))
        assert call.text == reply.text and call.note is None
        toolset.functions[call.name].bind(call)  # the right parameters, each of its declared type
    assert backend.grammar_stats["steps"] > 0 and backend.grammar_stats["seconds"] > 0


def test_rows_without_a_grammar_are_decoded_as_if_no_row_had_one(backend, problems):
    prompts = [[{"role": "user", "content": p.question}] for p in problems[:3]]
    plain = backend.chat(prompts, GenerationSettings(max_tokens=20))
    grammar = TASKS[problems[0].task].toolset(problems[0]).grammar()
    mixed = backend.chat(prompts, GenerationSettings(max_tokens=20, grammars=(grammar, None, None)))
    assert [r.text for r in mixed[1:]] == [r.text for r in plain[1:]]
    assert mixed[0].text != plain[0].text and parse_call(mixed[0].text)


def test_the_agent_under_the_grammar_makes_no_invalid_call(backend, problems):
    chains = run_chains(backend, TASKS, problems[:6], AgentConfig(grammar=True, max_steps=3), progress=False)
    kinds = {call["kind"] for c in chains for call in c.calls}
    assert kinds and kinds <= {"ok", "function_error"}, kinds


def test_a_backend_that_cannot_constrain_is_refused_at_once(queue_backend, problems):
    with pytest.raises(ValueError, match="constrained decoding needs a local model"):
        run_chains(queue_backend(["answer(value=True)"]), TASKS, problems[:1], AgentConfig(grammar=True))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: TeacherSettings(teacher_grammar=True, teacher_url="http://127.0.0.1:1/v1"), "teacher_grammar needs"),
        (lambda: TeacherSettings(teacher_grammar=True, teacher_backend="server"), "teacher_grammar needs"),
        (lambda: EvalSettings(eval_models=["base+grammar"], student_url="http://127.0.0.1:1/v1"), r"base\+grammar"),
        (lambda: EvalSettings(eval_models=["dpo+grammar"], dpo_url="http://127.0.0.1:1/v1"), r"dpo\+grammar"),
        (lambda: AgentConfig(grammar=True, protocol="native"), "needs protocol 'text'"),
    ],
)
def test_a_grammar_where_it_cannot_apply_is_refused_before_anything_runs(build, message):
    with pytest.raises(SettingsError, match=message):
        build()


def test_an_unconstrained_agent_keeps_the_fingerprint_of_files_written_before_grammars(queue_backend):
    plain = fingerprint(queue_backend([]), AgentConfig())
    assert "grammar" not in plain["agent"]
    assert fingerprint(queue_backend([]), AgentConfig(grammar=True))["agent"]["grammar"] is True


def test_metrics_compare_the_grammar_baseline_with_both_students(tmp_path):
    def record(source, pid, correct):
        return {
            "source": source,
            "problem_id": pid,
            "task": "fol",
            "sample": 0,
            "outcome": "correct" if correct else "wrong_answer",
            "correct": correct,
            "answer_correct": correct,
            "final_answer": True,
            "calls": [{"kind": "ok", "code": None}],
            "steps": 1,
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        }

    solved = {"base": [0], "base+grammar": [0, 1, 2], "dpo": [0, 1, 2, 3, 4], "dpo+grammar": [0, 1, 2, 3, 4, 5]}
    records = [record(src, f"p{i}", i in ok) for src, ok in solved.items() for i in range(10)]
    m = metrics(records)
    assert set(m["comparisons"]) == {"base vs base+grammar", "base+grammar vs dpo", "dpo vs dpo+grammar"}
    table = m["comparisons"]["base+grammar vs dpo"]["fol"]["table"]
    assert (table["base_only"], table["other_only"], table["both"]) == (0, 2, 3)
    assert m["paired"]["fol"]["models"] == ["base", "dpo"]
    report = write_report(tmp_path, m, {}).read_text()
    assert "## Constrained decoding" in report and "dpo+grammar 60.0% vs dpo 50.0%" in report
    assert "comparisons" not in metrics([r for r in records if "+" not in r["source"]])


def test_step_sampling_passes_each_reference_turn_its_grammar(problems, tmp_path):
    from fclib.teacher import sample_steps

    class Recording:
        model_id = "recording"
        constrained_decoding = True

        def __init__(self):
            self.grammars = []

        def chat(self, conversations, settings, tools=None):
            self.grammars += list(settings.grammars)
            return [Reply("answer(value=True)", 1, 1) for _ in conversations]

    refs = [c.to_dict() for c in replay_references(problems[:2]) if c.outcome == "correct"]
    backend = Recording()
    sample_steps(
        backend, problems[:2], tmp_path / "steps.jsonl", refs, config=AgentConfig(grammar=True), progress=False
    )
    expected = [
        TASKS[r["task"]].toolset(problems[0] if r["problem_id"] == problems[0].id else problems[1]).grammar()
        for r in refs
        for m in r["messages"][r["n_prompt"] :]
        if m["role"] == "assistant"
    ]
    assert backend.grammars == expected and expected
