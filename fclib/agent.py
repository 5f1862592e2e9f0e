"""The agent loop: a model solves problems by calling functions, one call per turn.

The prompt is a system message (task instructions, each function's description and example
calls, the protocol) and the problem as the user message. Each turn the model writes one call;
the agent parses it (`fclib.protocol`), executes it (`fclib.tools`) and feeds the result or
the error back as the next message. A chain ends when the model calls the final-answer
function, or at the step limit, the retry limit for unusable replies, the token limit, or a
backend error; every ending has a named outcome. Many chains advance together, one batched
backend call per step, so the local backend generates for all of them at once.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from fclib.backends import ChatBackend, GenerationSettings, Message, Reply
from fclib.problems import Problem
from fclib.protocol import CallSyntaxError, ParsedCall, from_tool_call, parse_call
from fclib.runs import progress_bar
from fclib.settings import Settings
from fclib.tools import Execution, Toolset, format_value

log = logging.getLogger(__name__)

OUTCOMES = ("correct", "wrong_answer", "no_answer", "invalid_call", "max_steps", "error")

PROTOCOL_TEXT = (
    "Reply with exactly one function call per turn, written like name(arg=value), and nothing else. "
    "Use literal values only: numbers, quoted strings, True or False. "
    "The result of each call comes back in the next message. "
    "When you know the answer, call {final}."
)
PROTOCOL_NATIVE = "Call one function per turn. When you know the answer, call {final}."
PROTOCOLS = ("text", "native")  # how calls travel: in the reply's text, or as the API's tool_calls


@dataclass(frozen=True)
class Task:
    """What the agent needs from a task: instructions, a toolset per problem, a checker."""

    name: str
    instructions: str
    toolset: Callable[[Problem], Toolset]
    # check(problem, final_answer, calls) -> correct?  `calls` are the chain's call records.
    check: Callable[[Problem, Any, list[dict[str, Any]]], bool]
    # A worked example as chat turns (user question, assistant calls, results), placed before
    # the problem: small models follow a demonstrated exchange far better than a description.
    demo: tuple[Message, ...] = ()
    # The final answer alone equals the gold one, whether or not the chain derived it. Where
    # `check` also verifies the derivation (FOL), both labels are recorded: a guess that is
    # right by luck is `answer_correct` but not `correct`.
    answer_check: Callable[[Problem, Any], bool] | None = None


@dataclass
class AgentConfig(Settings):
    """Limits and sampling of the agent loop; the defaults are the `cpu` profile's (evaluation: greedy)."""

    # the agent samples greedily unless told (eval_temperature); the teacher gives its own temperature
    PARAMETER_NAMES: ClassVar[dict[str, str]] = {"temperature": "eval_temperature"}

    max_steps: int = 8  # model turns per chain
    max_retries: int = 3  # consecutive turns without a usable call before giving up
    max_tokens_per_turn: int = 40  # a FOL call on lists of n truth values needs about 4n + 10
    max_chain_tokens: int = 2048  # context length (prompt + reply) a chain may reach
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    protocol: str = "text"  # 'text': one name(arg=value) call per reply; 'native': OpenAI `tools` and `tool_calls`
    stop: tuple[str, ...] = ("\n\n",)
    # Constrained decoding: each reply is one well-formed call of the chain's toolset (`Toolset.grammar`),
    # for backends that can (`constrained_decoding`: the local one). Set by notebooks 02 (teacher_grammar)
    # and 05 (the `+grammar` models), not a run parameter of its own.
    grammar: bool = False

    @property
    def native_tools(self) -> bool:
        return self.protocol == "native"

    def faults(self) -> list[str]:
        wrong = [
            f"{name} must be at least 1, got {getattr(self, name)!r}"
            for name in ("max_steps", "max_tokens_per_turn", "max_chain_tokens")
            if getattr(self, name) < 1
        ]
        if self.max_retries < 0 or self.temperature < 0 or not 0 < self.top_p <= 1:
            wrong.append("max_retries and temperature must be >= 0 and top_p in (0, 1]")
        if self.protocol not in PROTOCOLS:
            wrong.append(f"protocol must be {' or '.join(PROTOCOLS)}, not {self.protocol!r}")
        if self.grammar and self.protocol != "text":
            wrong.append("constrained decoding (a grammar) needs protocol 'text'")
        return wrong


@dataclass
class Chain:
    """One problem solved once: every message, call and result, and how it ended."""

    problem_id: str
    task: str
    sample: int
    model: str
    source: str  # who produced it: a teacher label, 'reference', a student label
    messages: list[Message]
    n_prompt: int  # messages[:n_prompt] is the prompt: system, demonstration, problem
    calls: list[dict[str, Any]] = field(default_factory=list)
    final_answer: Any = None
    correct: bool = False
    answer_correct: bool = False
    outcome: str | None = None
    reason: str = ""
    steps: int = 0
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    latency_s: float = 0.0
    retries: int = 0
    tools: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record (the chains.jsonl contract)."""
        return asdict(self)

    @property
    def done(self) -> bool:
        return self.outcome is not None


def system_prompt(task: Task, toolset: Toolset, native_tools: bool = False) -> str:
    """The system message: task instructions, the functions with examples, the protocol."""
    protocol = (PROTOCOL_NATIVE if native_tools else PROTOCOL_TEXT).format(final=f"{toolset.final_name}(...)")
    return f"{task.instructions}\n\nFunctions you can call:\n{toolset.render()}\n\n{protocol}"


def initial_messages(task: Task, problem: Problem, toolset: Toolset, native_tools: bool = False) -> list[Message]:
    """The prompt of a chain: system message and the problem."""
    return [
        {"role": "system", "content": system_prompt(task, toolset, native_tools)},
        *[dict(m) for m in task.demo],
        {"role": "user", "content": problem.question},
    ]


def run_chains(
    backend: ChatBackend,
    task: Task | dict[str, Task],
    problems: Sequence[Problem],
    config: AgentConfig | None = None,
    samples: int | Sequence[int] = 1,
    progress: bool = True,
    source: str | None = None,
    on_done: Callable[[Chain], None] | None = None,
) -> list[Chain]:
    """Solve every problem `samples` times; all chains advance together, one batch per step.

    `task` is one Task or a mapping from task name to Task for a mix of problems. `samples`
    is a count or the sample indices to run (a resumed run asks only for the missing ones).
    Each chain is passed to `on_done` the moment it ends. Every request carries a seed
    derived from (seed, problem, sample, step), so a chain's samples are the same whichever
    chains share its batch, in process and on servers that honour per-request seeds.
    """
    config = config or AgentConfig()
    check_constrained(backend, config)
    tasks = task if isinstance(task, dict) else {task.name: task}
    missing = {p.task for p in problems} - set(tasks)
    if missing:
        raise ValueError(f"no Task given for problem task(s) {sorted(missing)}")
    indices = range(samples) if isinstance(samples, int) else samples
    states = []
    for p in problems:
        toolset = tasks[p.task].toolset(p)
        for s in indices:
            messages = initial_messages(tasks[p.task], p, toolset, config.native_tools)
            chain = Chain(
                problem_id=p.id,
                task=p.task,
                sample=s,
                model=backend.model_id,
                source=source or backend.model_id,
                messages=messages,
                n_prompt=len(messages),
                tools=toolset.openai_tools() if config.native_tools else None,
            )
            states.append(_State(chain, p, tasks[p.task], toolset))
    bar = progress_bar(total=len(states), desc="chains", unit="chain", disable=not progress)
    grammars = {id(s): s.toolset.grammar() for s in states} if config.grammar else {}  # one per chain, made once

    forget = getattr(backend, "forget", None)  # a backend that keeps each conversation's keys and values

    def ended(state: _State) -> None:
        bar.update(1)
        if forget is not None:
            forget([state.chain.messages])
        if on_done is not None:
            on_done(state.chain)

    for step in range(config.max_steps):
        active = [s for s in states if not s.chain.done]
        if not active:
            break
        bar.set_postfix(step=step + 1, active=len(active))
        settings = GenerationSettings(
            max_tokens=config.max_tokens_per_turn,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=config.seed * 1000 + step,
            stop=() if config.native_tools else config.stop,
            seeds=tuple(_request_seed(config.seed, s.chain, step) for s in active),
            grammars=tuple(grammars[id(s)] for s in active) if grammars else (),
        )
        replies = _ask(backend, active, settings, config)
        for state, reply in zip(active, replies):
            state.advance(reply, config)
            if state.chain.done:
                ended(state)
    for state in states:
        if not state.chain.done:
            state.finish("max_steps", f"no answer after {config.max_steps} steps")
            ended(state)
    bar.close()
    return [s.chain for s in states]


def check_constrained(backend: ChatBackend, config: AgentConfig) -> None:
    """Refuse at once a grammar for a backend that cannot constrain its decoding."""
    if config.grammar and not getattr(backend, "constrained_decoding", False):
        raise ValueError(
            f"constrained decoding needs a local model in this process; {type(backend).__name__} cannot"
            " (a teacher endpoint or a server): drop the grammar or use an in-process backend"
        )


def _request_seed(seed: int, chain: Chain, step: int) -> int:
    """A stable seed for one request of one chain."""
    return zlib.crc32(f"{seed}:{chain.problem_id}:{chain.sample}:{step}".encode()) & 0x7FFFFFFF


def _ask(backend: ChatBackend, active: list[_State], settings: GenerationSettings, config: AgentConfig) -> list[Reply]:
    """One batched backend call; a failure of the whole call becomes an error reply per chain."""
    tools = active[0].chain.tools if config.native_tools else None
    same_tools = all(s.chain.tools == tools for s in active)
    try:
        if same_tools:
            return backend.chat([s.chain.messages for s in active], settings, tools)
        return [backend.chat([s.chain.messages], settings, s.chain.tools)[0] for s in active]
    except Exception as e:  # the backend is outside our control: record, never lose the batch
        log.exception("backend call failed")
        return [Reply("", 0, 0, "error", error=f"{type(e).__name__}: {e}") for _ in active]


class _State:
    """A chain in progress, with the problem, task and toolset it runs against."""

    def __init__(self, chain: Chain, problem: Problem, task: Task, toolset: Toolset):
        self.chain, self.problem, self.task, self.toolset = chain, problem, task, toolset
        self.failures = 0  # consecutive turns without a usable call

    def finish(self, outcome: str, reason: str = "") -> None:
        self.chain.outcome, self.chain.reason = outcome, reason

    def advance(self, reply: Reply, config: AgentConfig) -> None:
        """Take one reply: record it, run its call, feed the result back or end the chain."""
        chain = self.chain
        chain.steps += 1
        chain.usage["prompt_tokens"] += reply.prompt_tokens
        chain.usage["completion_tokens"] += reply.completion_tokens
        chain.latency_s += reply.latency_s
        chain.retries += reply.retries
        if reply.error is not None:
            self.finish("error", reply.error)
            return
        parsed, problem_text = self._parse(reply)
        native = config.native_tools and reply.tool_calls
        if native:
            chain.messages.append({"role": "assistant", "content": reply.text or "", "tool_calls": reply.tool_calls})
        else:
            chain.messages.append({"role": "assistant", "content": reply.text})
        if parsed is None:
            execution = Execution("", error=problem_text, kind="parse_error", code="parse_failure")
        else:
            execution = self.toolset.execute(parsed)
        record = {
            "step": chain.steps,
            "text": str(parsed) if parsed is not None else reply.text.strip()[:500],
            "name": execution.name,
            "arguments": execution.kwargs,
            "kind": execution.kind,
            "result": execution.value,
            "error": execution.error,
            "code": execution.code,
            "note": parsed.note if parsed is not None else None,
        }
        chain.calls.append(record)

        if execution.ok and execution.final:
            chain.final_answer = execution.value
            chain.correct = bool(self.task.check(self.problem, execution.value, chain.calls))
            answer_check = self.task.answer_check
            chain.answer_correct = bool(answer_check(self.problem, execution.value)) if answer_check else chain.correct
            reason = "right answer, not derived from the facts" if chain.answer_correct and not chain.correct else ""
            self.finish("correct" if chain.correct else "wrong_answer", reason)
            return
        feedback = _feedback(execution, parsed)
        if native:
            for i, tc in enumerate(reply.tool_calls or []):
                text = feedback if i == 0 else "Not executed: one call per turn."
                chain.messages.append({"role": "tool", "tool_call_id": tc.get("id", f"call_{i}"), "content": text})
        else:
            chain.messages.append({"role": "user", "content": feedback})

        self.failures = self.failures + 1 if execution.kind in ("parse_error", "invalid_call") else 0
        if self.failures > config.max_retries:
            self.finish("invalid_call", f"{self.failures} turns in a row without a valid call; last: {execution.error}")
        elif reply.prompt_tokens + reply.completion_tokens >= config.max_chain_tokens:
            self.finish("no_answer", f"token limit: the chain reached {config.max_chain_tokens} tokens")

    def _parse(self, reply: Reply) -> tuple[ParsedCall | None, str]:
        try:
            if reply.tool_calls:
                call = from_tool_call(reply.tool_calls[0])
                if len(reply.tool_calls) > 1:
                    call.note = (
                        f"{len(reply.tool_calls)} calls found; only the first was executed. Call one function per turn."
                    )
                return call, ""
            return parse_call(reply.text, known=set(self.toolset.functions)), ""
        except CallSyntaxError as e:
            first = next(iter(self.toolset))
            return None, f"{e}. Example of a call: {first.example_text(0)}"


def _feedback(execution: Execution, parsed: ParsedCall | None) -> str:
    """The message the model reads after its call."""
    if execution.ok:
        text = f"Result: {format_value(execution.value)}"
    else:
        text = f"Error: {execution.error}"
    if parsed is not None and parsed.note:
        text += f"\n(Note: {parsed.note})"
    return text


def demo_messages(question: str, toolset: Toolset, calls: Sequence[str]) -> tuple[Message, ...]:
    """A worked example as chat turns: the question, then each call with the result it really gives."""
    turns: list[Message] = [{"role": "user", "content": question}]
    for text in calls:
        parsed = parse_call(text, set(toolset.functions))
        execution = toolset.execute(parsed)
        if not execution.ok:
            raise ValueError(f"demonstration call {text} fails: {execution.error}")
        turns.append({"role": "assistant", "content": text})
        if not execution.final:  # after the final call comes the problem: roles keep alternating
            turns.append({"role": "user", "content": _feedback(execution, parsed)})
    return tuple(turns)


def outcome_counts(chains: Sequence[Chain | dict[str, Any]]) -> dict[str, int]:
    """Number of chains (or chain records) per outcome, every outcome listed."""
    counts = {o: 0 for o in OUTCOMES}
    for c in chains:
        counts[(c["outcome"] if isinstance(c, dict) else c.outcome) or "error"] += 1
    return counts


def transcript(chain: Chain | dict[str, Any]) -> str:
    """A readable transcript of a chain: the problem, each call with its result, the outcome."""
    record = chain.to_dict() if isinstance(chain, Chain) else chain
    question = record["messages"][record["n_prompt"] - 1]["content"]
    lines = [
        f"[{record['task']}] {record['problem_id']} (sample {record['sample']}, {record['model']})",
        f"Q: {question}",
    ]
    for call in record["calls"]:
        shown = " ".join(call["text"].split())
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        result = f"-> {format_value(call['result'])}" if call["error"] is None else f"!! {call['error']}"
        lines.append(f"  {call['step']:>2}. {shown}  {result}")
    answer = "" if record["final_answer"] is None else f", answer {format_value(record['final_answer'])}"
    reason = f" ({record['reason']})" if record.get("reason") else ""
    lines.append(f"  => {record['outcome']}{answer}{reason}")
    return "\n".join(lines)
