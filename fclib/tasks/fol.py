"""First-order logic over a finite world, reasoned through function calls.

A world has individuals and unary predicates; a question is a closed formula with ∀/∃, ¬, ∧,
∨ and →, shown in words and in symbols, whose answer is True or False. The facts of the world
are reached only through functions (`truth_values`, `holds`), and the connectives and
quantifiers are functions too, applied element-wise to lists of truth values, so a correct
chain of calls *is* the evaluation of the formula:

    ∀x (red(x) → round(x))
    truth_values(predicate='red')        -> [True, False, True]
    truth_values(predicate='round')      -> [True, True, False]
    implies(a=[True, False, True], b=[True, True, False])  -> [True, True, False]
    for_all(values=[True, True, False])  -> False
    answer(value=False)

A chain is *verified* when its answer is the result of its own last logical call and it
looked up every predicate the question mentions; only verified chains count as correct, since
on a True/False task half of all guesses are right.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from fclib.agent import Task, demo_messages
from fclib.problems import Problem
from fclib.protocol import format_call
from fclib.tools import Example, Function, Param, ToolError, Toolset

NAME = "fol"
INDIVIDUALS = (
    "alice",
    "bob",
    "carol",
    "dave",
    "erin",
    "frank",
    "grace",
    "heidi",
    "ivan",
    "judy",
    "kevin",
    "laura",
    "mike",
    "nina",
    "oscar",
    "peggy",
    "quinn",
    "rita",
    "sam",
    "tina",
    "uma",
    "victor",
    "wendy",
    "xena",
    "yuri",
    "zoe",
)
PREDICATES = ("red", "round", "heavy", "shiny", "small", "wooden", "old", "soft")
LOGICAL = ("logical_not", "logical_and", "logical_or", "implies", "for_all", "exists")
_BINARY = {"and": "logical_and", "or": "logical_or", "implies": "implies"}
_SYMBOL = {"and": "∧", "or": "∨", "implies": "→"}
_WORD = {"and": "and", "or": "or"}
_APPLY = {"and": lambda a, b: a and b, "or": lambda a, b: a or b, "implies": lambda a, b: (not a) or b}

Formula = list  # ["atom", p] | ["not", f] | [op, f, g] | ["forall", f] | ["exists", f]


# ---- evaluation and rendering -------------------------------------------------------------


def truth(formula: Formula, world: dict[str, list[str]], individuals: Sequence[str], x: str | None = None) -> bool:
    """Truth of a formula in a world (predicate -> individuals where it holds)."""
    op = formula[0]
    if op == "atom":
        if x is None:
            raise ValueError("atom outside a quantifier")
        return x in world[formula[1]]
    if op == "not":
        return not truth(formula[1], world, individuals, x)
    if op in ("forall", "exists"):
        values = (truth(formula[1], world, individuals, i) for i in individuals)
        return all(values) if op == "forall" else any(values)
    return _APPLY[op](truth(formula[1], world, individuals, x), truth(formula[2], world, individuals, x))


def symbols(formula: Formula) -> str:
    """The formula in logical notation: `∀x (red(x) → ¬round(x))`."""
    op = formula[0]
    if op == "atom":
        return f"{formula[1]}(x)"
    if op == "not":
        inner = symbols(formula[1])
        return f"¬{inner}" if formula[1][0] in ("atom", "not", "forall", "exists") else f"¬({inner})"
    if op in ("forall", "exists"):
        return f"{'∀' if op == 'forall' else '∃'}x ({_strip(symbols(formula[1]))})"
    return f"({symbols(formula[1])} {_SYMBOL[op]} {symbols(formula[2])})"


def words(formula: Formula) -> str:
    """The formula in English."""
    op = formula[0]
    if op == "atom":
        return f"x is {formula[1]}"
    if op == "not":
        if formula[1][0] == "atom":
            return f"x is not {formula[1][1]}"
        return f"it is not the case that {words(formula[1])}"
    if op == "forall":
        return f"for every individual x, {words(formula[1])}"
    if op == "exists":
        return f"there is an individual x such that {words(formula[1])}"
    if op == "implies":
        return f"if {words(formula[1])} then {words(formula[2])}"
    return f"({words(formula[1])} {_WORD[op]} {words(formula[2])})"


def _strip(text: str) -> str:
    return text[1:-1] if text.startswith("(") and text.endswith(")") else text


def predicates_of(formula: Formula) -> set[str]:
    """The predicates a formula mentions."""
    if formula[0] == "atom":
        return {formula[1]}
    return set().union(*(predicates_of(f) for f in formula[1:]))


# ---- generation ---------------------------------------------------------------------------


def _body(rng: random.Random, preds: Sequence[str], depth: int) -> Formula:
    """A formula in the free variable x with at most `depth` connectives nested."""
    if depth <= 0 or rng.random() < 0.3:
        atom: Formula = ["atom", rng.choice(preds)]
        return ["not", atom] if rng.random() < 0.25 else atom
    op = rng.choice(["and", "or", "implies", "not"])
    if op == "not":
        return ["not", _body(rng, preds, depth - 1)]
    left = _body(rng, preds, depth - 1)
    right = _body(rng, [p for p in preds if p not in predicates_of(left)] or preds, depth - 1)
    return [op, left, right]


def _sentence(rng: random.Random, preds: Sequence[str], depth: int) -> Formula:
    quantified: Formula = [rng.choice(["forall", "exists"]), _body(rng, preds, depth)]
    if depth >= 2 and rng.random() < 0.3:
        other: Formula = [rng.choice(["forall", "exists"]), _body(rng, preds, depth - 1)]
        return [rng.choice(["and", "or", "implies"]), quantified, other]
    return ["not", quantified] if rng.random() < 0.2 else quantified


def generate(
    count: int, seed: int, nmax: int = 6, depth: int = 1, n_predicates: int = 3, split: str = "train"
) -> list[Problem]:
    """`count` seeded FOL problems with 2..nmax individuals, balanced between True and False."""
    if nmax < 2 or nmax > len(INDIVIDUALS):
        raise ValueError(f"nmax must be between 2 and {len(INDIVIDUALS)}, got {nmax}")
    if not 1 <= n_predicates <= len(PREDICATES) or depth < 0 or count < 0:
        raise ValueError(f"n_predicates must be 1..{len(PREDICATES)}, depth and count >= 0")
    rng = random.Random(f"fol-{seed}-{split}-{nmax}-{depth}-{n_predicates}")
    problems = []
    for i in range(count):
        want = i % 2 == 0  # alternate the answer so that guessing one value scores 50%
        for _ in range(200):
            n = rng.randint(max(2, nmax // 2), nmax)
            people = sorted(rng.sample(INDIVIDUALS, n), key=INDIVIDUALS.index)
            preds = sorted(rng.sample(PREDICATES, n_predicates), key=PREDICATES.index)
            world = {p: [x for x in people if rng.random() < 0.5] for p in preds}
            formula = _sentence(rng, preds, depth)
            value = truth(formula, world, people)
            if value == want:
                break
        problems.append(
            make_problem(f"fol-{split}-n{nmax}-d{depth}-{i:05d}", people, world, formula, nmax=nmax, depth=depth)
        )
    return problems


def make_problem(
    pid: str, individuals: Sequence[str], world: dict[str, list[str]], formula: Formula, **meta: Any
) -> Problem:
    """A FOL problem from its world and formula; the answer is computed here."""
    value = truth(formula, world, individuals)
    question = (
        f"The world has {len(individuals)} individuals and the predicates {', '.join(world)}. "
        f"Is the following statement true or false? In words: {words(formula)}. In symbols: {symbols(formula)}"
    )
    meta = {
        "individuals": list(individuals),
        "world": {p: list(v) for p, v in world.items()},
        "formula": formula,
        "symbols": symbols(formula),
        "n": len(individuals),
        **meta,
    }
    return Problem(pid, NAME, question, value, meta)


# ---- functions ----------------------------------------------------------------------------


def _elementwise(fn):
    def apply(a, b=None):
        unary = b is None
        if unary:
            return [fn(v) for v in a] if isinstance(a, list) else fn(a)
        if isinstance(a, list) != isinstance(b, list):
            raise ToolError("a and b must both be lists or both be single values")
        if isinstance(a, list):
            if len(a) != len(b):
                raise ToolError(f"a and b have different lengths ({len(a)} and {len(b)})")
            return [fn(x, y) for x, y in zip(a, b)]
        return fn(a, b)

    return apply


_BOOLS = (bool, list)


def toolset(problem: Problem) -> Toolset:
    """The functions of a FOL problem: its world's facts, connectives, quantifiers, answer."""
    people: list[str] = problem.meta["individuals"]
    world: dict[str, list[str]] = problem.meta["world"]
    preds = tuple(world)
    pred = Param("predicate", str, "a predicate name", choices=preds)
    who = Param("individual", str, "an individual's name", choices=tuple(people))
    a = Param("a", _BOOLS, "True/False or a list of them")
    b = Param("b", _BOOLS, "True/False or a list of them, like a")
    values = Param("values", list, "a list of True/False")
    ex_list = [True, False, True]
    return Toolset(
        [
            Function(
                "individuals",
                "List the individuals of the world, in order.",
                (),
                lambda: list(people),
                (Example({}, ["alice", "bob", "carol"]),),
            ),
            Function(
                "truth_values",
                "Whether the predicate holds for each individual, in the order of individuals().",
                (pred,),
                lambda predicate: [x in world[predicate] for x in people],
                (Example({"predicate": "red"}, ex_list),),
            ),
            Function(
                "holds",
                "Whether the predicate holds for one individual.",
                (pred, who),
                lambda predicate, individual: individual in world[predicate],
                (Example({"predicate": "red", "individual": "alice"}, True),),
            ),
            Function(
                "logical_not",
                "Negation, element-wise on lists: not a.",
                (a,),
                _elementwise(lambda x: not x),
                (Example({"a": ex_list}),),
            ),
            Function(
                "logical_and",
                "Conjunction, element-wise on lists: a and b.",
                (a, b),
                _elementwise(lambda x, y: x and y),
                (Example({"a": [True, True, False], "b": [True, False, False]}),),
            ),
            Function(
                "logical_or",
                "Disjunction, element-wise on lists: a or b.",
                (a, b),
                _elementwise(lambda x, y: x or y),
                (Example({"a": [True, False, False], "b": [False, False, True]}),),
            ),
            Function(
                "implies",
                "Implication, element-wise on lists: if a then b.",
                (a, b),
                _elementwise(lambda x, y: (not x) or y),
                (Example({"a": [True, True, False], "b": [True, False, False]}),),
            ),
            Function(
                "for_all",
                "True when every value is True (the quantifier ∀).",
                (values,),
                lambda values: all(values),
                (Example({"values": [True, True, False]}),),
            ),
            Function(
                "exists",
                "True when at least one value is True (the quantifier ∃).",
                (values,),
                lambda values: any(values),
                (Example({"values": [False, True, False]}),),
            ),
            Function(
                "answer",
                "Give the final answer, True or False; this ends the chain.",
                (Param("value", bool, "the answer"),),
                lambda value: value,
                (Example({"value": True}),),
                final=True,
            ),
        ]
    )


# ---- checking and reference chains --------------------------------------------------------


def answer_check(problem: Problem, answer: Any) -> bool:
    """The answer alone equals the gold truth value."""
    return isinstance(answer, bool) and answer == problem.answer


def check(problem: Problem, answer: Any, calls: list[dict[str, Any]]) -> bool:
    """Correct = right answer, *verified*: it is the result of the chain's last logical call,
    and the chain looked up every predicate of the formula."""
    if not answer_check(problem, answer):
        return False
    done = [c for c in calls if c["kind"] == "ok" and c["name"] != "answer"]
    logical = [c for c in done if c["name"] in LOGICAL]
    if not logical or logical[-1]["result"] is not answer:
        return False
    looked_up = {c["arguments"].get("predicate") for c in done if c["name"] in ("truth_values", "holds")}
    return predicates_of(problem.meta["formula"]) <= looked_up


def faithful(calls: list[dict[str, Any]]) -> bool:
    """Every value the chain's logical calls and its answer take is one an earlier call returned, exactly.

    `check` asks that the answer be the last logical call's result and that every predicate of the
    formula was looked up; it does not follow the values between calls, so a chain that copies a
    list of truth values wrongly (a value dropped or added, common in large worlds) can still pass
    it. A faithful chain copied nothing wrongly."""
    returned: list[Any] = []
    for c in calls:
        if c.get("kind") != "ok":
            continue
        if c.get("name") in (*LOGICAL, "answer"):
            for v in c["arguments"].values():
                if not any(type(v) is type(r) and v == r for r in returned):
                    return False
        returned.append(c.get("result"))
    return True


def reference_calls(problem: Problem) -> list[tuple[str, dict[str, Any]]]:
    """The calls that evaluate the problem's formula, then `answer`."""
    people, world = problem.meta["individuals"], problem.meta["world"]
    calls: list[tuple[str, dict[str, Any]]] = []

    def column(f: Formula) -> list[bool]:
        op = f[0]
        if op == "atom":
            calls.append(("truth_values", {"predicate": f[1]}))
            return [x in world[f[1]] for x in people]
        if op == "not":
            a = column(f[1])
            calls.append(("logical_not", {"a": a}))
            return [not v for v in a]
        a, b = column(f[1]), column(f[2])
        calls.append((_BINARY[op], {"a": a, "b": b}))
        return [_APPLY[op](x, y) for x, y in zip(a, b)]

    def value(f: Formula) -> bool:
        op = f[0]
        if op in ("forall", "exists"):
            col = column(f[1])
            calls.append(("for_all" if op == "forall" else "exists", {"values": col}))
            return all(col) if op == "forall" else any(col)
        if op == "not":
            v = value(f[1])
            calls.append(("logical_not", {"a": v}))
            return not v
        a, b = value(f[1]), value(f[2])
        calls.append((_BINARY[op], {"a": a, "b": b}))
        return _APPLY[op](a, b)

    result = value(problem.meta["formula"])
    return calls + [("answer", {"value": result})]


INSTRUCTIONS = (
    "You answer questions about a small world of individuals and predicates. You cannot see the world: "
    "look up the facts with truth_values or holds, combine them with the logical functions, "
    "apply the quantifier with for_all or exists, then give the result with answer."
)
_DEMO_PROBLEM = make_problem(
    "fol-demo",
    ["ann", "ben", "cat"],
    {"cold": ["ann", "cat"], "blue": ["ann", "ben"]},
    ["forall", ["implies", ["atom", "cold"], ["atom", "blue"]]],
)
DEMO = demo_messages(
    _DEMO_PROBLEM.question,
    toolset(_DEMO_PROBLEM),
    [format_call(name, kwargs) for name, kwargs in reference_calls(_DEMO_PROBLEM)],
)

TASK = Task(NAME, INSTRUCTIONS, toolset, check, DEMO, answer_check)
