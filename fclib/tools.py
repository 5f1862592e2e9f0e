"""Functions a model may call, toolsets that render them into prompts, and safe execution.

A *function* has a name, typed parameters, a one-line description and example calls. A
*toolset* renders its functions as prompt text (description + examples, as the paper
injects them), as the OpenAI `tools` JSON schema and as a grammar for constrained decoding,
and executes calls: names, arity, types and ranges are checked before anything runs, and
every failure becomes a message meant for the model, never an exception that ends the chain.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fclib.protocol import ParsedCall, format_call

# Numbers beyond this size are refused, as arguments and as results: they are never needed by
# the tasks and a model asking for them (power(10, 10**9)) would stall or exhaust the machine.
MAX_ABS_NUMBER = 1e15
MAX_STRING = 200
MAX_LIST = 100
_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string", list: "list of booleans"}
_TYPE_WORDS = {int: "integer", float: "number", bool: "True or False", str: "string", list: "list of True/False"}


ERROR_CODES = ("parse_failure", "unknown_function", "wrong_arguments", "bad_value", "function_error")


class ToolError(Exception):
    """A failure the model should read (e.g. division by zero), with a code for the evaluation's taxonomy.

    The message is for the model and free to change; `code` (one of `ERROR_CODES`) is what
    programs read.
    """

    def __init__(self, message: str, code: str = "bad_value"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Param:
    """One typed parameter; `float` accepts integers too, `choices` restricts values."""

    name: str
    type: type | tuple[type, ...]  # bool, int, float, str, list (of booleans), or a tuple of these
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None

    def check(self, value: Any) -> Any:
        """Return the value converted to this parameter's type, or raise ToolError."""
        if isinstance(self.type, tuple):
            for t in self.type:
                if (t is list) == isinstance(value, list):
                    return Param(self.name, t, self.description, self.minimum, self.maximum, self.choices).check(value)
            raise ToolError(f"{self.name} must be {self.type_text()}, got {_show(value)}")
        if self.type is list:
            if not isinstance(value, list):
                raise ToolError(f"{self.name} must be a list of True/False, got {_show(value)}")
            if len(value) > MAX_LIST:
                raise ToolError(f"{self.name} has too many items ({len(value)}, limit {MAX_LIST})")
            if not all(isinstance(v, bool) for v in value):
                raise ToolError(f"{self.name} must hold only True or False, got {_show(value)}")
            return list(value)
        if self.type is bool:
            if not isinstance(value, bool):
                raise ToolError(f"{self.name} must be True or False, got {_show(value)}")
        elif self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ToolError(f"{self.name} must be a {_TYPE_WORDS[self.type]}, got {_show(value)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ToolError(f"{self.name} must be a finite number")
            if abs(value) > MAX_ABS_NUMBER:
                raise ToolError(f"{self.name} is too large (limit {MAX_ABS_NUMBER:g})")
            if self.type is int:
                if isinstance(value, float):
                    if not value.is_integer():
                        raise ToolError(f"{self.name} must be an integer, got {value}")
                    value = int(value)
        elif self.type is str:
            if not isinstance(value, str):
                raise ToolError(f"{self.name} must be a quoted string, got {_show(value)}")
            if len(value) > MAX_STRING:
                raise ToolError(f"{self.name} is too long ({len(value)} characters)")
        if self.minimum is not None and value < self.minimum:
            raise ToolError(f"{self.name} must be at least {self.minimum:g}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise ToolError(f"{self.name} must be at most {self.maximum:g}, got {value}")
        if self.choices is not None and value not in self.choices:
            shown = ", ".join(repr(c) for c in self.choices[:12])
            more = ", ..." if len(self.choices) > 12 else ""
            raise ToolError(f"{self.name} must be one of {shown}{more}; got {_show(value)}")
        return value

    def type_text(self) -> str:
        """`number`, `boolean or list of booleans`, ..."""
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        return " or ".join(_JSON_TYPES[t] for t in types)

    def schema(self) -> dict[str, Any]:
        """JSON schema of this parameter."""
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        alts = [
            {"type": "array", "items": {"type": "boolean"}} if t is list else {"type": _JSON_TYPES[t]} for t in types
        ]
        out: dict[str, Any] = alts[0] if len(alts) == 1 else {"anyOf": alts}
        if self.description:
            out["description"] = self.description
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.choices is not None:
            out["enum"] = list(self.choices)
        return out


@dataclass(frozen=True)
class Example:
    """An example call; its result is computed by the function unless given."""

    kwargs: dict[str, Any]
    result: Any = None


@dataclass(frozen=True)
class Function:
    """A callable function: name, parameters, one-line description, examples, implementation."""

    name: str
    description: str
    params: tuple[Param, ...]
    impl: Callable[..., Any]
    examples: tuple[Example, ...] = ()
    final: bool = False  # calling it ends the chain with its argument as the answer

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"function name {self.name!r} is not an identifier")
        if not self.examples:
            raise ValueError(f"function {self.name} needs at least one example call")

    def signature(self) -> str:
        """`name(a: number, b: number)`."""
        params = ", ".join(f"{p.name}: {p.type_text()}" for p in self.params)
        return f"{self.name}({params})"

    def bind(self, call: ParsedCall) -> dict[str, Any]:
        """Map positional and keyword arguments to checked parameter values."""
        names = [p.name for p in self.params]
        if len(call.args) > len(names):
            given = len(call.args) + len(call.kwargs)
            raise ToolError(f"{self.name} takes {len(names)} argument(s), got {given}", "wrong_arguments")
        values = dict(zip(names, call.args))
        for key, value in call.kwargs.items():
            if key not in names:
                raise ToolError(
                    f"{self.name} has no parameter {key!r}; its parameters are {', '.join(names) or 'none'}",
                    "wrong_arguments",
                )
            if key in values:
                raise ToolError(f"{self.name} got {key!r} twice", "wrong_arguments")
            values[key] = value
        missing = [n for n in names if n not in values]
        if missing:
            raise ToolError(
                f"{self.name} is missing {', '.join(missing)}; call it as {self.example_text(0)}", "wrong_arguments"
            )
        return {p.name: p.check(values[p.name]) for p in self.params}

    def example_text(self, i: int) -> str:
        """The i-th example as `name(a=1, b=2)`."""
        return format_call(self.name, self.examples[i].kwargs)

    def example_result(self, i: int) -> Any:
        """The i-th example's result: given, or computed by the function."""
        ex = self.examples[i]
        return ex.result if ex.result is not None else self.impl(**ex.kwargs)


@dataclass
class Execution:
    """What running one call gave: a value, or an error message for the model."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    value: Any = None
    error: str | None = None
    kind: str = "ok"  # ok | invalid_call (never ran) | function_error (ran and refused) | parse_error
    final: bool = False
    code: str | None = None  # None when ok, else one of ERROR_CODES

    @property
    def ok(self) -> bool:
        return self.error is None


class Toolset:
    """An ordered set of functions with exactly one final-answer function."""

    def __init__(self, functions: list[Function]):
        self.functions = {f.name: f for f in functions}
        if len(self.functions) != len(functions):
            raise ValueError("function names must be unique")
        finals = [f.name for f in functions if f.final]
        if len(finals) != 1:
            raise ValueError(f"a toolset needs exactly one final-answer function, got {finals}")
        self.final_name = finals[0]

    def __iter__(self):
        return iter(self.functions.values())

    def __len__(self) -> int:
        return len(self.functions)

    def render(self) -> str:
        """Prompt text: each function's signature, description and example calls with results."""
        lines = []
        for f in self:
            lines.append(f"- {f.signature()}: {f.description}")
            for i in range(len(f.examples)):
                result = "ends the chain" if f.final else format_value(f.example_result(i))
                lines.append(f"  Example: {f.example_text(i)} -> {result}")
        return "\n".join(lines)

    def openai_tools(self) -> list[dict[str, Any]]:
        """The OpenAI `tools` JSON schema of these functions."""
        return [
            {
                "type": "function",
                "function": {
                    "name": f.name,
                    "description": f.description,
                    "parameters": {
                        "type": "object",
                        "properties": {p.name: p.schema() for p in f.params},
                        "required": [p.name for p in f.params],
                        "additionalProperties": False,
                    },
                },
            }
            for f in self
        ]

    def grammar(self) -> str:
        """A Lark grammar (llguidance's dialect) of exactly one call to one of these functions, as
        `format_call` writes it: every parameter by keyword, in declared order, each a literal of its
        declared type (one of its `choices` where it has them), and nothing before or after.

        Ranges are not encoded: a value out of range is well formed and the function refuses it.
        """
        rules = [f"start: {' | '.join(f'call_{f.name}' for f in self)}"]
        for f in self:
            parts = [json.dumps(f"{f.name}(", ensure_ascii=False)]
            for i, p in enumerate(f.params):
                parts += [json.dumps(f"{', ' if i else ''}{p.name}=", ensure_ascii=False), _value_grammar(p)]
            parts.append('")"')
            rules.append(f"call_{f.name}: {' '.join(parts)}")
        used = [t for name, t in _TERMINALS.items() if any(f"{name})" in r or f"{name} |" in r for r in rules)]
        return "\n".join(rules + used) + "\n"

    def execute(self, call: ParsedCall) -> Execution:
        """Validate and run a parsed call; every failure is returned as an error message."""
        f = self.functions.get(call.name)
        if f is None:
            known = ", ".join(self.functions)
            error = f"unknown function {call.name!r}; the functions are {known}"
            return Execution(call.name, error=error, kind="invalid_call", code="unknown_function")
        try:
            kwargs = f.bind(call)
        except ToolError as e:
            return Execution(call.name, error=str(e), kind="invalid_call", code=e.code)
        failed = {"kind": "function_error", "final": f.final, "code": "function_error"}
        try:
            value = f.impl(**kwargs)
            _check_result(value)
        except ToolError as e:
            return Execution(f.name, kwargs, error=str(e), **failed)
        except ZeroDivisionError:
            return Execution(f.name, kwargs, error="division by zero", **failed)
        except (ArithmeticError, ValueError) as e:  # overflow, math domain errors
            return Execution(f.name, kwargs, error=f"{f.name} failed: {e}", **failed)
        return Execution(f.name, kwargs, value=value, final=f.final)


# The literals of each type, as Python writes them (`ast` must accept them: no leading zeros).
_DIGITS = len(str(int(MAX_ABS_NUMBER)))
_TERMINALS = {
    "BOOL": 'BOOL: "True" | "False"',
    "BOOLS": f"BOOLS: /\\[((True|False)(, (True|False)){{0,{MAX_LIST - 1}}})?\\]/",
    "INT": f"INT: /-?(0|[1-9][0-9]{{0,{_DIGITS - 1}}})/",
    "NUMBER": f"NUMBER: /-?(0|[1-9][0-9]{{0,{_DIGITS - 1}}})(\\.[0-9]{{1,10}})?/",
    "STRING": f"STRING: /'[^'\\\\\\n]{{0,{MAX_STRING}}}'/",
}
_TYPE_TERMINALS = {bool: "BOOL", list: "BOOLS", int: "INT", float: "NUMBER", str: "STRING"}


def _value_grammar(p: Param) -> str:
    """The grammar of one parameter's value: one of its choices, or a literal of one of its types."""
    if p.choices is not None:
        return "(" + " | ".join(json.dumps(repr(c), ensure_ascii=False) for c in p.choices) + ")"
    types = p.type if isinstance(p.type, tuple) else (p.type,)
    return "(" + " | ".join(_TYPE_TERMINALS[t] for t in types) + ")"


def _check_result(value: Any) -> None:
    if isinstance(value, complex):
        raise ToolError("the result is not a real number")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ToolError("the result is not a finite number")
        if abs(value) > MAX_ABS_NUMBER:
            raise ToolError(f"the result is too large (limit {MAX_ABS_NUMBER:g})")


def format_value(value: Any) -> str:
    """Show a result the way the model reads it: integral floats without `.0`, short floats."""
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return f"{value:.10g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
