"""Functions and toolsets: rendering, schema, and execution that validates before it runs."""

import json

import pytest

from fclib.protocol import ParsedCall, parse_call
from fclib.tasks.gsm8k import TOOLSET
from fclib.tools import Example, Function, Param, Toolset


def run(text):
    return TOOLSET.execute(parse_call(text, set(TOOLSET.functions)))


def test_render_shows_descriptions_and_examples_with_computed_results():
    text = TOOLSET.render()
    assert "- divide(a: number, b: number): Divide a by b" in text
    assert "Example: divide(a=48, b=2) -> 24" in text
    assert "Example: final_answer(value=72) -> ends the chain" in text


def test_openai_schema():
    tools = TOOLSET.openai_tools()
    json.dumps(tools)
    add = next(t for t in tools if t["function"]["name"] == "add")
    assert add["type"] == "function"
    assert add["function"]["parameters"]["required"] == ["a", "b"]
    assert add["function"]["parameters"]["properties"]["a"]["type"] == "number"
    power = next(t for t in tools if t["function"]["name"] == "power")
    assert power["function"]["parameters"]["properties"]["b"]["maximum"] == 64


@pytest.mark.parametrize(
    "text, value",
    [
        ("add(a=2, b=-3)", -1),
        ("add(2, 3)", 5),
        ("divide(a=7, b=2)", 3.5),
        ("power(a=2, b=10)", 1024),
        ("remainder(17, 5)", 2),
    ],
)
def test_valid_calls_run(text, value):
    ex = run(text)
    assert ex.ok and ex.kind == "ok" and ex.value == value


@pytest.mark.parametrize(
    "text, kind, message",
    [
        ("fly(a=1)", "invalid_call", "unknown function 'fly'"),
        ("add(a=1)", "invalid_call", "missing b"),
        ("add(1, 2, 3)", "invalid_call", "takes 2 argument"),
        ("add(a=1, c=2)", "invalid_call", "no parameter 'c'"),
        ("add(1, a=2)", "invalid_call", "twice"),
        ("add(a='two', b=2)", "invalid_call", "must be a number"),
        ("add(a=True, b=2)", "invalid_call", "must be a number"),
        ("add(a=[1], b=2)", "invalid_call", "must be a number"),
        ("power(a=10, b=1000000000)", "invalid_call", "at most 64"),
        ("add(a=" + "9" * 600 + ", b=1)", "invalid_call", "too large"),
        ("multiply(a=100000000, b=100000000)", "function_error", "result is too large"),
        ("power(a=10, b=60)", "function_error", "too large"),
        ("divide(a=1, b=0)", "function_error", "division by zero"),
        ("remainder(a=1, b=0)", "function_error", "by zero"),
        ("power(a=0, b=-1)", "function_error", "negative power"),
        ("power(a=-8, b=0.5)", "function_error", "not a real number"),
    ],
)
def test_bad_calls_become_messages(text, kind, message):
    ex = run(text)
    assert not ex.ok and ex.kind == kind
    assert message in ex.error


def test_int_params_accept_integral_floats_and_choices_are_enforced():
    f = Function(
        "pick",
        "Pick.",
        (Param("n", int, minimum=0), Param("who", str, choices=("ann", "bob"))),
        lambda n, who: f"{who}{n}",
        (Example({"n": 1, "who": "ann"}),),
        final=True,
    )
    ts = Toolset([f])
    assert ts.execute(ParsedCall("pick", (), {"n": 2.0, "who": "bob"})).value == "bob2"
    assert "integer" in ts.execute(ParsedCall("pick", (), {"n": 2.5, "who": "bob"})).error
    assert "at least 0" in ts.execute(ParsedCall("pick", (), {"n": -1, "who": "bob"})).error
    assert "one of 'ann', 'bob'" in ts.execute(ParsedCall("pick", (), {"n": 1, "who": "eve"})).error
    assert "too long" in ts.execute(ParsedCall("pick", (), {"n": 1, "who": "x" * 500})).error


def test_toolset_definition_errors():
    f = Function("f", "F.", (), lambda: 1, (Example({}),))
    with pytest.raises(ValueError, match="exactly one final"):
        Toolset([f])
    with pytest.raises(ValueError, match="at least one example"):
        Function("g", "G.", (), lambda: 1)
    with pytest.raises(ValueError, match="not an identifier"):
        Function("g h", "G.", (), lambda: 1, (Example({}),))
