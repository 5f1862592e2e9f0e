"""Chat backends behind one interface: many conversations in, one reply each out.

`LocalBackend` runs a transformers model in process and generates for many conversations in
one batch (left padding, stop strings, seeded sampling, a token limit per reply). An
OpenAI-compatible backend implements the same `chat` method over HTTP. The agent only ever
calls `backend.chat(conversations, ...)`, so the same loop drives a local student and a
remote teacher.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

Message = dict[str, Any]


@dataclass
class Reply:
    """One generated assistant turn."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"  # stop | length | error
    tool_calls: list[dict[str, Any]] | None = None
    latency_s: float = 0.0
    retries: int = 0
    error: str | None = None


@dataclass
class GenerationSettings:
    """How to sample one reply; temperature 0 means greedy."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


class ChatBackend(Protocol):
    """Anything that turns conversations into assistant replies."""

    model_id: str

    def chat(
        self, conversations: Sequence[list[Message]], settings: GenerationSettings, tools: list[dict] | None = None
    ) -> list[Reply]:
        """One reply per conversation, in order."""
        ...


class LocalBackend:
    """A transformers causal LM generating for a batch of conversations at once."""

    def __init__(self, model: Any, tokenizer: Any, model_id: str | None = None, batch_size: int = 16):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.model_id = model_id or getattr(model.config, "_name_or_path", "") or type(model).__name__

    @classmethod
    def load(cls, name: str, batch_size: int = 16, **kwargs: Any) -> "LocalBackend":
        """A backend for the embedded model, a local folder or a hub id."""
        from fclib.models import load_model

        model, tokenizer = load_model(name, **kwargs)
        return cls(model, tokenizer, model_id=str(name), batch_size=batch_size)

    def render(self, conversation: list[Message], tools: list[dict] | None = None) -> str:
        """The prompt text of a conversation, by the tokenizer's own chat template."""
        kwargs = {"tools": tools} if tools else {}
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True, **kwargs)

    def count_tokens(self, conversation: list[Message], tools: list[dict] | None = None) -> int:
        """Number of prompt tokens of a conversation."""
        return len(self.tokenizer(self.render(conversation, tools), add_special_tokens=False)["input_ids"])

    def chat(
        self, conversations: Sequence[list[Message]], settings: GenerationSettings, tools: list[dict] | None = None
    ) -> list[Reply]:
        """Generate one reply per conversation, `batch_size` conversations at a time."""
        prompts = [self.render(c, tools) for c in conversations]
        # Batches of similar length waste less on padding; results go back in input order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        replies: list[Reply | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            for i, reply in zip(idx, self._generate([prompts[i] for i in idx], settings)):
                replies[i] = reply
        return replies  # type: ignore[return-value]

    def _generate(self, prompts: list[str], settings: GenerationSettings) -> list[Reply]:
        import torch

        tok = self.tokenizer
        t0 = time.perf_counter()
        batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=settings.max_tokens,
            pad_token_id=tok.pad_token_id,
            do_sample=settings.temperature > 0,
        )
        if settings.temperature > 0:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
        else:  # the model's generation_config may carry sampling defaults that greedy must not warn about
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if settings.stop:
            kwargs.update(stop_strings=list(settings.stop), tokenizer=tok)
        kwargs.update(settings.extra)
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(settings.seed)
            out = self.model.generate(**batch, **kwargs)
        new = out[:, batch["input_ids"].shape[1] :]
        elapsed = time.perf_counter() - t0
        stops = {t for t in (tok.eos_token_id, tok.pad_token_id) if t is not None}
        prompt_lens = batch["attention_mask"].sum(dim=1).tolist()
        replies = []
        for row, n_prompt in zip(new.tolist(), prompt_lens):
            n = next((i for i, t in enumerate(row) if t in stops), len(row))
            ended = n < len(row)
            text = tok.decode(row[:n], skip_special_tokens=True)
            cut = _cut_at_stop(text, settings.stop)
            finish = "stop" if ended or cut is not None or n < settings.max_tokens else "length"
            replies.append(
                Reply(
                    text=cut if cut is not None else text,
                    prompt_tokens=int(n_prompt),
                    completion_tokens=n + (1 if ended else 0),
                    finish_reason=finish,
                    latency_s=elapsed,
                )
            )
        return replies


def _cut_at_stop(text: str, stop: Sequence[str]) -> str | None:
    """Text before the first stop string (OpenAI semantics: the stop string is not included)."""
    hits = [text.index(s) for s in stop if s and s in text]
    return text[: min(hits)] if hits else None


class ScriptedBackend:
    """Replies from a script instead of a model: the reference chains, and tests.

    `scripts` maps a problem's question to the assistant turns to send, in order. The
    conversation's question is found as the last user message that is a key of `scripts`;
    the number of assistant turns after it says which scripted turn comes next. A chain that
    runs past its script gets empty replies.
    """

    def __init__(self, scripts: dict[str, list[str]], model_id: str = "scripted"):
        self.scripts = scripts
        self.model_id = model_id

    def chat(
        self, conversations: Sequence[list[Message]], settings: GenerationSettings, tools: list[dict] | None = None
    ) -> list[Reply]:
        """The next scripted turn of each conversation."""
        replies = []
        for conversation in conversations:
            at = max((i for i, m in enumerate(conversation) if m["role"] == "user" and m["content"] in self.scripts), default=None)
            if at is None:
                raise KeyError("conversation matches no script")
            turn = sum(1 for m in conversation[at:] if m["role"] == "assistant")
            script = self.scripts[conversation[at]["content"]]
            text = script[turn] if turn < len(script) else ""
            replies.append(Reply(text=text, prompt_tokens=0, completion_tokens=0))
        return replies
