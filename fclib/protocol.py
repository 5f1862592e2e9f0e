"""The text protocol: one Python-style call per turn, parsed without evaluating anything.

A model answers with a call such as `add(a=2, b=-3)`. The text is untrusted: it is parsed
with `ast` and its arguments are accepted only when they are literal values (numbers,
strings, booleans, None, lists and tuples of those, a sign in front of a number). Nothing is
ever passed to `eval`, `exec` or `sympify`. Small models wrap calls in prose, code fences or a
trailing period, or write several calls at once: the first call is taken and the others are
reported. Native `tool_calls` objects from an OpenAI-compatible server go through
`from_tool_call` and end up as the same `ParsedCall`.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any

MAX_CALL_CHARS = 1000  # a single call longer than this is garbage, not a call
MAX_SCAN_CHARS = 20000  # text beyond this is not searched
MAX_LITERAL_DEPTH = 4
_BARE_LITERALS = {"true": True, "false": False, "True": True, "False": False, "None": None, "null": None}


class CallSyntaxError(ValueError):
    """The model's text holds no acceptable call; the message is meant for the model."""


@dataclass
class ParsedCall:
    """A call as the model wrote it: a function name and literal arguments."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    note: str | None = None  # e.g. "3 calls found; only the first was executed"

    def __str__(self) -> str:
        return self.text or format_call(self.name, self.kwargs, self.args)


def format_call(name: str, kwargs: dict[str, Any], args: tuple[Any, ...] = ()) -> str:
    """Canonical text of a call: `name(1, b=2)`."""
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


def parse_call(text: str, known: set[str] | frozenset[str] | None = None) -> ParsedCall:
    """Find and parse the first call in a model's reply; raise CallSyntaxError otherwise.

    With `known`, a call to a known function is preferred over prose that merely looks like a
    call (`I will use f(x) now`). A call may span lines inside its parentheses. Time is linear
    in the length of the reply.
    """
    if not isinstance(text, str):
        raise CallSyntaxError("the reply is not text")
    written = text[:MAX_SCAN_CHARS]
    scan = _strip_fences(written)
    if not scan.strip():
        raise CallSyntaxError("the reply is empty; write one function call")
    found: list[ParsedCall] = []
    errors: list[tuple[str, CallSyntaxError]] = []
    covered = -1  # calls nested inside an earlier candidate are part of it, not calls of their own
    for start, open_paren, end in _candidates(scan):
        if start < covered:
            continue
        name = scan[start:open_paren]
        if end is None:
            errors.append((name, CallSyntaxError(f"the call to {name} is unclosed")))
            continue
        try:
            call = _parse_candidate(scan, start, open_paren, end)
            if call is not None:
                call.text = written[start : end + 1]  # as the model wrote it, fences and all
        except CallSyntaxError as e:
            errors.append((name, e))
            covered = end
            continue
        if call is not None:
            found.append(call)
            covered = end
    if known is not None:
        preferred = [c for c in found if c.name in known]
        found = preferred or found
        errors.sort(key=lambda ne: ne[0] not in known)
    if not found:
        if errors:
            raise errors[0][1]
        raise CallSyntaxError("no function call found; write exactly one call and nothing else")
    call = found[0]
    if len(found) > 1:
        call.note = f"{len(found)} calls found; only the first, {call.text}, was executed. Write one call per turn."
    return call


def from_tool_call(tool_call: Any) -> ParsedCall:
    """Turn a native OpenAI `tool_calls` entry (dict or client object) into a ParsedCall."""
    fn = tool_call.get("function") if isinstance(tool_call, dict) else getattr(tool_call, "function", None)
    if fn is None:
        raise CallSyntaxError("the tool call has no function")
    name = fn.get("name") if isinstance(fn, dict) else getattr(fn, "name", None)
    raw = fn.get("arguments") if isinstance(fn, dict) else getattr(fn, "arguments", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise CallSyntaxError(f"the tool call names no valid function: {str(name)[:40]!r}")
    if raw in (None, ""):
        kwargs: Any = {}
    elif isinstance(raw, dict):
        kwargs = raw
    else:
        if not isinstance(raw, str) or len(raw) > MAX_CALL_CHARS:
            raise CallSyntaxError("the tool call's arguments are not a short JSON object")
        try:
            kwargs = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise CallSyntaxError(f"the tool call's arguments are not valid JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise CallSyntaxError("the tool call's arguments must be a JSON object")
    for key, value in kwargs.items():
        _check_plain(value, key, 0)
    return ParsedCall(name, (), dict(kwargs), text=format_call(name, kwargs))


def _strip_fences(text: str) -> str:
    """`text` with code fences and backticks blanked out, character for character, so that a position in the
    result is the same position in the reply (a call's text is then cut from the reply as written)."""
    blanked = re.sub(r"```[A-Za-z0-9_+-]*", lambda m: "\n" + " " * (len(m.group()) - 1), text)
    return blanked.replace("`", " ")


def _parse_candidate(text: str, start: int, open_paren: int, end: int) -> ParsedCall | None:
    """Parse the call spanning text[start:end + 1]; None when it is not a call at all."""
    snippet = text[start : end + 1]
    name = text[start:open_paren]
    before = start - 1
    while before >= 0 and text[before].isspace():
        before -= 1
    if before >= 0 and text[before] == ".":
        raise CallSyntaxError(f"attribute access is not allowed: call {name}(...) directly, by name alone")
    after = end + 1
    while after < len(text) and text[after].isspace():
        after += 1
    if text[after : after + 1] in ("(", "[") or (
        text[after : after + 1] == "." and text[after + 1 : after + 2].isidentifier()
    ):
        raise CallSyntaxError("write a single plain call; calling, indexing or accessing its result is not allowed")
    if len(snippet) > MAX_CALL_CHARS:
        raise CallSyntaxError(f"the call to {name} is too long ({len(snippet)} characters)")
    try:
        tree = ast.parse(snippet, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        msg = getattr(e, "msg", None) or str(e) or type(e).__name__
        raise CallSyntaxError(f"the call to {name} is not valid syntax: {msg}") from None
    node = tree.body
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        return None
    args = tuple(_literal(a, f"argument {i + 1}", 0) for i, a in enumerate(node.args))
    kwargs: dict[str, Any] = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise CallSyntaxError("**keyword unpacking is not allowed; write name=value")
        if kw.arg in kwargs:
            raise CallSyntaxError(f"argument {kw.arg!r} is given twice")
        kwargs[kw.arg] = _literal(kw.value, kw.arg, 0)
    return ParsedCall(node.func.id, args, kwargs, text=snippet)


def _is_name_char(ch: str) -> bool:
    """Whether `ch` may continue a Python identifier (Unicode letters, digits, marks, `_`)."""
    if ch.isascii():
        return ch.isalnum() or ch == "_"
    return ("a" + ch).isidentifier()


def _candidates(text: str) -> list[tuple[int, int, int | None]]:
    """(start, opening parenthesis, closing parenthesis or None) of every `name(` in `text`, in order.

    A candidate is an identifier, by Python's rules (Unicode letters included), glued to `(`;
    the identifier is the whole run of identifier characters before the parenthesis, so a
    letter of any script glued in front makes another name. The closing parenthesis of each
    candidate is found as a scan from its own parenthesis would find it (quoted strings
    skipped, backslash escapes inside them), but in one pass for all candidates: scans that
    reach a position in the same quoting state go on identically, so at most five distinct
    scans (outside quotes, inside '...' or "...", just after a backslash in either) are
    ever followed at once, each with a stack of the candidates it holds open.
    """
    starts: dict[int, int] = {}  # opening parenthesis -> start of its name
    closes: dict[int, int] = {}  # opening parenthesis -> its closing one
    scans: dict[tuple[str, int], list[list[int]]] = {}  # (quote or "", escape position or -1) -> open levels
    for m in _EVENTS.finditer(text):
        i, ch = m.start(), m.group()
        moved: dict[tuple[str, int], list[list[int]]] = {}
        for (quote, escape), stack in scans.items():
            if escape >= 0:  # the character after a backslash is taken literally
                if escape == i - 1:
                    _merge(moved, (quote, -1), stack)
                    continue
                escape = -1
            if not quote:
                if ch == "(":
                    stack.append([])
                elif ch == ")":
                    for paren in stack.pop():
                        closes[paren] = i
                    if not stack:
                        continue  # every candidate of this scan is closed
                elif ch in "'\"":
                    quote = ch
            elif ch == quote:
                quote = ""
            elif ch == "\\":
                escape = i
            _merge(moved, (quote, escape), stack)
        scans = moved
        if ch == "(":
            start = i
            while start > 0 and _is_name_char(text[start - 1]):
                start -= 1
            if start < i and text[start:i].isidentifier():
                starts[i] = start
                stack = scans.setdefault(("", -1), [[]])
                stack[-1].append(i)
    return [(start, paren, closes.get(paren)) for paren, start in starts.items()]


_EVENTS = re.compile(r"[()'\"\\]")


def _merge(scans: dict[tuple[str, int], list[list[int]]], state: tuple[str, int], stack: list[list[int]]) -> None:
    """Add a scan's open levels to the scan already in `state` (the innermost levels line up)."""
    other = scans.get(state)
    if other is None:
        scans[state] = stack
        return
    if len(other) < len(stack):
        scans[state], other, stack = stack, stack, other
    for depth in range(1, len(stack) + 1):
        other[-depth].extend(stack[-depth])


def _literal(node: ast.AST, where: str, depth: int) -> Any:
    """A literal value of a call argument; anything that would need evaluation is refused."""
    if depth > MAX_LITERAL_DEPTH:
        raise CallSyntaxError(f"{where} is nested too deeply")
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (bool, int, float, str)) or node.value is None:
            return node.value
        raise CallSyntaxError(f"{where} has an unsupported literal type {type(node.value).__name__}")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = node.operand
        if (
            isinstance(inner, ast.Constant)
            and isinstance(inner.value, (int, float))
            and not isinstance(inner.value, bool)
        ):
            return -inner.value if isinstance(node.op, ast.USub) else inner.value
        raise CallSyntaxError(f"{where}: a sign may only stand before a number")
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, where, depth + 1) for e in node.elts]
    if isinstance(node, ast.Name):
        if node.id in _BARE_LITERALS:
            return _BARE_LITERALS[node.id]
        raise CallSyntaxError(
            f"{where} is the name {node.id!r}, not a value: quote strings ('{node.id}') and write numbers as digits"
        )
    kind = {
        ast.Call: "a nested call: call one function per turn and use its result in the next call",
        ast.BinOp: "an arithmetic expression: compute it with a function call",
        ast.Attribute: "an attribute access",
        ast.Lambda: "a lambda",
        ast.Starred: "a starred argument",
        ast.ListComp: "a comprehension",
        ast.GeneratorExp: "a comprehension",
        ast.SetComp: "a comprehension",
        ast.DictComp: "a comprehension",
        ast.Subscript: "an indexing expression",
        ast.Compare: "a comparison",
        ast.BoolOp: "a boolean expression",
    }.get(type(node), f"an expression ({type(node).__name__})")
    raise CallSyntaxError(f"{where} is {kind}; only literal values are allowed")


def _check_plain(value: Any, where: str, depth: int) -> None:
    """JSON arguments of native calls: plain values, shallow."""
    if depth > MAX_LITERAL_DEPTH:
        raise CallSyntaxError(f"{where} is nested too deeply")
    if isinstance(value, list):
        for v in value:
            _check_plain(v, where, depth + 1)
    elif not (isinstance(value, (bool, int, float, str)) or value is None):
        raise CallSyntaxError(f"{where} must be a plain value, not {type(value).__name__}")
