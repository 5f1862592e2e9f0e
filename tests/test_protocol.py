"""The text protocol: tolerant of noise, and nothing the model writes is ever evaluated."""

import pytest

from fclib.protocol import CallSyntaxError, from_tool_call, parse_call

KNOWN = {"add", "multiply", "power", "final_answer"}


@pytest.mark.parametrize(
    "text, name, args, kwargs",
    [
        ("add(a=2, b=-3)", "add", (), {"a": 2, "b": -3}),
        ("add(2, 3.5)", "add", (2, 3.5), {}),
        ("Sure! Here is the call:\n```python\nadd(a=1, b=2)\n```\nThat adds them.", "add", (), {"a": 1, "b": 2}),
        ("add(a=2, b=3).", "add", (), {"a": 2, "b": 3}),
        ("`multiply(a=4, b=6)`", "multiply", (), {"a": 4, "b": 6}),
        ("final_answer(value=true)", "final_answer", (), {"value": True}),
        ("final_answer('yes')", "final_answer", ("yes",), {}),
        ("add(a=[1, 2], b=None)", "add", (), {"a": [1, 2], "b": None}),
        ("I could use add(x, y) here, so: add(a=1, b=2)", "add", (), {"a": 1, "b": 2}),
    ],
)
def test_noisy_replies_parse(text, name, args, kwargs):
    call = parse_call(text, KNOWN)
    assert (call.name, call.args, call.kwargs) == (name, args, kwargs)


def test_several_calls_take_the_first_and_say_so():
    call = parse_call("add(a=1, b=2)\nmultiply(a=3, b=4)", KNOWN)
    assert call.name == "add" and call.kwargs == {"a": 1, "b": 2}
    assert "2 calls found" in call.note and "only the first" in call.note


@pytest.mark.parametrize(
    "text, message",
    [
        ("__import__('os').system('id')", "not allowed"),
        ("os.system('id')", "attribute access"),
        ("add(a=(1).__class__, b=2)", "attribute access"),
        ("add(a=lambda: 1, b=2)", "lambda"),
        ("add(a=[x for x in range(9)], b=1)", "comprehension"),
        ("add(*[1, 2])", "starred"),
        ("add(**{'a': 1})", "unpacking"),
        ("add(a=multiply(a=2, b=3), b=1)", "nested call"),
        ("add(a=2*3, b=1)", "arithmetic expression"),
        ("power(a=10, b=10**9)", "arithmetic expression"),
        ("add(a=x, b=1)", "not a value"),
        ("add(a=1, b=2)[0]", "single plain call"),
        ("add(a=1, a=2)", "twice"),
        ("", "empty"),
        ("   \n  ", "empty"),
        ("The answer is 42.", "no function call"),
        ("add(a=" + "9" * 5000 + ", b=1)", "too long"),
        ("add(a=1, b=2", "unclosed"),
        ("\udcff\udcfe\x00 add(a=\x00, b=1)", "not valid syntax"),
    ],
)
def test_hostile_or_broken_replies_are_refused_with_a_message(text, message):
    with pytest.raises(CallSyntaxError) as e:
        parse_call(text, KNOWN)
    assert message in str(e.value)


@pytest.mark.parametrize("n", [5000, 20000, 100000])
def test_long_garbage_is_refused_quickly(n):
    import random

    rng = random.Random(n)
    garbage = "".join(rng.choice("abc()[]{}'\"=,.:;\\ \n9_") for _ in range(n))
    try:
        parse_call(garbage, KNOWN)
    except CallSyntaxError:
        pass  # any named refusal is fine; a crash or a hang is not


def test_deep_nesting_is_refused():
    with pytest.raises(CallSyntaxError):
        parse_call("add(a=" + "[" * 300 + "]" * 300 + ", b=1)", KNOWN)


def test_nothing_is_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    for text in (f"__import__('pathlib').Path('{marker}').touch()", f"open('{marker}', 'w')", f"exec('open(\"{marker}\",\"w\")')"):
        try:
            parse_call(text, KNOWN)
        except CallSyntaxError:
            pass
    assert not marker.exists()


def test_native_tool_calls_go_through_the_same_path():
    call = from_tool_call({"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}})
    assert (call.name, call.kwargs, call.text) == ("add", {"a": 2, "b": 3}, "add(a=2, b=3)")
    with pytest.raises(CallSyntaxError, match="not valid JSON"):
        from_tool_call({"function": {"name": "add", "arguments": "{a: 2"}})
    with pytest.raises(CallSyntaxError, match="JSON object"):
        from_tool_call({"function": {"name": "add", "arguments": "[1, 2]"}})
    with pytest.raises(CallSyntaxError, match="no valid function"):
        from_tool_call({"function": {"name": "__import__('os')", "arguments": "{}"}})
    with pytest.raises(CallSyntaxError, match="plain value"):
        from_tool_call({"function": {"name": "add", "arguments": '{"a": {"b": 1}}'}})
