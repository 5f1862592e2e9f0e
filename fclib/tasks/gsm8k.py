"""GSM8K: grade-school math word problems, solved with arithmetic functions.

Problems load from the copy shipped in `fclib/data/gsm8k/` (checksummed), from a folder of
JSONL files, or with `datasets` from a hub id (online). The gold answer is the number after
`####`. The `<<48/2=24>>` annotations of a solution become a reference chain of calls: each
expression is parsed with `ast` into calls (never evaluated), and the chain ends with
`final_answer` on the value that matches the gold answer.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fclib.agent import Task, demo_messages
from fclib.problems import Problem
from fclib.protocol import ParsedCall
from fclib.runs import jsonl_lines
from fclib.tools import Example, Function, Param, ToolError, Toolset

NAME = "gsm8k"
HUB_ID = "openai/gsm8k"
SHIPPED = Path(__file__).resolve().parents[1] / "data" / "gsm8k"  # MIT, see its README.md
REL_TOL = 1e-6
ABS_TOL = 1e-6

_NUMBER = re.compile(r"-?\$?\s*-?[\d,]*\.?\d+")
_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
# A plain equation written without annotation, e.g. "260 - 60 = 200" or "4 x 5 = $20".
_PLAIN_EQUATION = re.compile(
    r"((?:\$?[\d.,]+|[()])(?:\s*(?:[-+*/x×÷]|\(|\))\s*(?:\$?[\d.,]+|[()]))+)\s*=\s*\$?\s*(-?[\d.,]+)"
)


def _num(name: str, description: str) -> Param:
    return Param(name, float, description)


def _divide(a: float, b: float) -> float:
    if b == 0:
        raise ToolError("division by zero")
    return a / b


def _remainder(a: float, b: float) -> float:
    if b == 0:
        raise ToolError("remainder by zero")
    return a % b


def _power(a: float, b: float) -> float:
    if a == 0 and b < 0:
        raise ToolError("zero cannot be raised to a negative power")
    return a**b


FUNCTIONS = (
    Function(
        "add",
        "Add two numbers: a + b.",
        (_num("a", "first term"), _num("b", "second term")),
        lambda a, b: a + b,
        (Example({"a": 48, "b": 24}),),
    ),
    Function(
        "subtract",
        "Subtract b from a: a - b.",
        (_num("a", "number to subtract from"), _num("b", "number to subtract")),
        lambda a, b: a - b,
        (Example({"a": 100, "b": 35}),),
    ),
    Function(
        "multiply",
        "Multiply two numbers: a * b.",
        (_num("a", "first factor"), _num("b", "second factor")),
        lambda a, b: a * b,
        (Example({"a": 12, "b": 5}),),
    ),
    Function(
        "divide",
        "Divide a by b: a / b.",
        (_num("a", "dividend"), _num("b", "divisor, not zero")),
        _divide,
        (Example({"a": 48, "b": 2}),),
    ),
    Function(
        "power",
        "Raise a to the power b: a ** b.",
        (_num("a", "base"), Param("b", float, "exponent", minimum=-64, maximum=64)),
        _power,
        (Example({"a": 2, "b": 3}),),
    ),
    Function(
        "remainder",
        "Remainder of a divided by b: a % b.",
        (_num("a", "dividend"), _num("b", "divisor, not zero")),
        _remainder,
        (Example({"a": 17, "b": 5}),),
    ),
    Function(
        "final_answer",
        "Give the final numeric answer; this ends the solution.",
        (_num("value", "the answer"),),
        lambda value: value,
        (Example({"value": 72}),),
        final=True,
    ),
)
TOOLSET = Toolset(list(FUNCTIONS))
_OPS = {
    ast.Add: "add",
    ast.Sub: "subtract",
    ast.Mult: "multiply",
    ast.Div: "divide",
    ast.Pow: "power",
    ast.Mod: "remainder",
}

INSTRUCTIONS = (
    "You solve grade-school math word problems by calling arithmetic functions, one call per turn. "
    "Read the problem, compute each intermediate quantity with a function call, "
    "then give the result with final_answer."
)
DEMO = demo_messages(
    "Anna has 4 boxes with 3 pens in each box. She gives away 5 pens. How many pens does she have left?",
    TOOLSET,
    ["multiply(a=4, b=3)", "subtract(a=12, b=5)", "final_answer(value=7)"],
)


def parse_number(text: Any) -> float | None:
    """A number from text such as '1,234', '$5', '-3.5', '.5'; None when there is none."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text)
    m = _NUMBER.search(str(text))
    if m is None:
        return None
    cleaned = m.group(0).replace("$", "").replace(",", "").replace(" ", "")
    try:
        return float(cleaned)
    except ValueError:
        return None


def gold_answer(solution: str) -> float:
    """The number after `####` in a GSM8K solution."""
    if "####" not in solution:
        raise ValueError("solution has no '####' answer line")
    value = parse_number(solution.rsplit("####", 1)[1])
    if value is None:
        raise ValueError(f"no number after '####': {solution.rsplit('####', 1)[1][:40]!r}")
    return value


def answers_match(a: Any, b: Any) -> bool:
    """Numeric equality with a small tolerance; non-numbers never match."""
    x, y = parse_number(a), parse_number(b)
    if x is None or y is None:
        return False
    return abs(x - y) <= max(ABS_TOL, REL_TOL * max(abs(x), abs(y)))


def check(problem: Problem, answer: Any, calls: list[dict[str, Any]]) -> bool:
    """A GSM8K answer is correct when it equals the gold number."""
    return answers_match(answer, problem.answer)


TASK = Task(NAME, INSTRUCTIONS, lambda problem: TOOLSET, check, DEMO)


def to_problem(record: dict[str, Any], split: str, index: int) -> Problem:
    """A GSM8K record ({question, answer}) as a Problem; the solution goes to meta."""
    return Problem(
        id=f"gsm8k-{split}-{index:05d}",
        task=NAME,
        question=record["question"].strip(),
        answer=gold_answer(record["answer"]),
        meta={"solution": record["answer"], "split": split, "index": index},
    )


def default_source() -> str:
    """The copy shipped inside the package (`fclib/data/gsm8k/`, checksummed)."""
    return str(SHIPPED)


def hub_id(source: str | Path | None) -> str | None:
    """The hub dataset id a `gsm8k_source` names, or None when it is local (the shipped copy, a folder)."""
    if not source or Path(source).exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        return None
    return str(source)


def load(split: str = "train", source: str | Path | None = None) -> list[Problem]:
    """GSM8K problems of a split: the shipped copy (default), a folder of `{split}.jsonl[.gz]`, or a hub id."""
    source = source or default_source()
    if Path(source).is_dir():
        records = list(_read_jsonl(_split_file(Path(source), split)))
    elif hub_id(source) is None:
        raise FileNotFoundError(
            f"gsm8k_source {str(source)!r} is neither a folder of {{train,test}}.jsonl files nor a hub id"
        )
    else:
        from datasets import load_dataset

        records = list(load_dataset(str(source), "main", split=split))
    return [to_problem(r, split, i) for i, r in enumerate(records)]


def _split_file(folder: Path, split: str) -> Path:
    for name in (f"{split}.jsonl", f"{split}.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no GSM8K file {split}.jsonl or {split}.jsonl.gz in {folder}")


def _expected_sha256(folder: Path) -> dict[str, str]:
    """The checksums a folder's SHA256SUMS lists (file name -> hex digest of the uncompressed file)."""
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return {}
    return {
        name.strip(): digest
        for digest, name in (line.split(None, 1) for line in sums.read_text().splitlines() if line.strip())
    }


def _read_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    """Records of a JSONL file (gzip when it ends in .gz), checked against SHA256SUMS beside it when listed."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    plain_name = path.name.removesuffix(".gz")
    expected = _expected_sha256(path.parent).get(plain_name)
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(
            f"{path}: checksum mismatch (SHA256SUMS lists {expected[:12]}... for {plain_name}); "
            "the file is damaged or was changed: restore it from git"
        )
    for n, line in enumerate(jsonl_lines(data), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record.get("question"), str) or not isinstance(record.get("answer"), str):
                raise ValueError("needs string fields 'question' and 'answer'")
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{path}, line {n}: {e}") from None
        yield record


def expression_calls(expression: str) -> tuple[list[tuple[str, dict[str, float]]], float]:
    """Calls that compute an arithmetic expression, innermost first, and its value.

    The expression is parsed with `ast` and walked; only numbers and + - * / ** % are
    accepted, and the values are computed by the toolset's own functions.
    """
    text = expression.replace(",", "").replace("x", "*").replace("×", "*").replace("÷", "/").replace("$", "")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    calls: list[tuple[str, dict[str, float]]] = []

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = walk(node.left), walk(node.right)
            name = _OPS[type(node.op)]
            kwargs = {"a": _tidy(a), "b": _tidy(b)}
            execution = TOOLSET.execute(ParsedCall(name, (), dict(kwargs)))
            if not execution.ok:
                raise ValueError(f"{name}{tuple(kwargs.values())}: {execution.error}")
            calls.append((name, kwargs))
            return float(execution.value)
        raise ValueError(f"unsupported element {type(node).__name__} in {expression!r}")

    return calls, walk(tree.body)


def reference_calls(problem: Problem) -> list[tuple[str, dict[str, float]]]:
    """A reference chain for a GSM8K problem: the calls of its annotations, then final_answer.

    When no annotation gives the gold answer, plain equations of the solution text are read
    too. Raises ValueError when the solution cannot be turned into a chain reaching the gold.
    """
    solution = problem.meta.get("solution", "")
    body = solution.rsplit("####", 1)[0]
    calls: list[tuple[str, dict[str, float]]] = []
    values: list[float] = []
    for expr, _ in _ANNOTATION.findall(body):
        try:
            new, value = expression_calls(expr)
        except ValueError:
            continue
        calls += new
        values.append(value)
    if not any(answers_match(v, problem.answer) for v in values):
        plain = _ANNOTATION.sub(" ", body).replace("\u2212", "-").replace("\u2013", "-")
        for expr, _ in _PLAIN_EQUATION.findall(plain):
            try:
                new, value = expression_calls(expr)
            except ValueError:
                continue
            if new:
                calls += new
                values.append(value)
    hits = [v for v in values if answers_match(v, problem.answer)]
    if not hits:
        raise ValueError(f"{problem.id}: no computed value equals the gold answer {problem.answer:g}")
    return calls + [("final_answer", {"value": _tidy(hits[-1])})]


def _tidy(value: float) -> float | int:
    """Integral floats as ints, so calls read `add(a=48, b=24)` rather than `48.0`."""
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else round(value, 10)
