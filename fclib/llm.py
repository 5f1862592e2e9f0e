"""Chat backends behind one interface: many conversations in, one reply each out.

`LocalBackend` runs a transformers model in process and generates for many conversations in
one batch (left padding, stop strings, seeded sampling, a token limit per reply).
`OpenAIBackend` implements the same `chat` method over any OpenAI-compatible endpoint, with
many requests in flight, retries with backoff and a timeout per request. The agent only ever
calls `backend.chat(conversations, ...)`, so the same loop drives a local student and a
remote teacher.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from fclib.kv_cache import PrefixCache, Span, use_gqa_sdpa

Message = dict[str, Any]
log = logging.getLogger(__name__)


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
    # One seed per conversation: a chain's samples then do not depend on which other chains
    # share its batch (the local backend draws each row from its own random stream; servers
    # that honour per-request seeds do the same). Without them the local backend seeds a batch.
    seeds: tuple[int, ...] = ()

    def seed_of(self, i: int) -> int:
        """The seed of conversation i."""
        return self.seeds[i] if self.seeds else self.seed


class ChatBackend(Protocol):
    """Anything that turns conversations into assistant replies."""

    model_id: str

    def chat(
        self, conversations: Sequence[list[Message]], settings: GenerationSettings, tools: list[dict] | None = None
    ) -> list[Reply]:
        """One reply per conversation, in order."""
        ...


class RowSampler:
    """A logits processor that samples each row from its own random stream (Gumbel-max).

    The argmax of `scores / temperature + Gumbel noise` is a sample of softmax(scores /
    temperature); tokens outside the top-p nucleus are set to -inf first. Each row draws its
    noise from a generator seeded with its own seed, one draw per decoding step, so its tokens
    depend on its own scores alone, not on the other rows of the batch. Generation must run
    greedy (`do_sample=False`) with this processor.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float = 1.0) -> None:
        import torch

        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            ordered, index = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            outside = probs.cumsum(-1) - probs >= self.top_p  # the mass before a token; the top token always stays
            scores = scores.masked_fill(outside.scatter(-1, index, outside), float("-inf"))
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
        return scores + gumbel.to(scores.device)


class LocalBackend:
    """A transformers causal LM generating for a batch of conversations at once.

    With `prefix_cache` (the default) each turn computes only its new tokens: the keys and
    values of each conversation's earlier turns, and the prompt prefix its task's chains
    share, are kept and reused (`fclib.kv_cache`); rows of one batch may reuse caches of
    different lengths. Reuse is decided on token ids alone, so it changes how much is
    computed, never what. `cache_tokens` bounds the memory it keeps, in row positions. On
    CPU, a model with grouped key/value heads is switched to an SDPA attention that gives the
    same output without copying those heads (`kv_cache.use_gqa_sdpa`).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        model_id: str | None = None,
        batch_size: int = 16,
        prefix_cache: bool = True,
        cache_tokens: int = 150_000,
    ):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.model = model
        self.tokenizer = tokenizer
        use_gqa_sdpa(model)
        self.batch_size = batch_size
        self.model_id = model_id or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.prefix_cache = prefix_cache
        self.kv = PrefixCache(model, cache_tokens)
        self._stops: dict[tuple[str, ...], Any] = {}

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

    @property
    def cache_stats(self) -> dict[str, int]:
        """Prompt tokens seen, reused from the cache, and computed once as shared prefixes."""
        return self.kv.stats

    def clear_cache(self) -> None:
        self.kv.clear()

    def chat(
        self, conversations: Sequence[list[Message]], settings: GenerationSettings, tools: list[dict] | None = None
    ) -> list[Reply]:
        """Generate one reply per conversation, `batch_size` conversations at a time."""
        ids = [self.tokenizer(self.render(c, tools), add_special_tokens=False)["input_ids"] for c in conversations]
        keys = [id(c) for c in conversations]
        if self.prefix_cache:
            self.kv.share_prefixes([r for k, r in zip(keys, ids) if k not in self.kv.entries])
        # Batches of similar length waste less on padding; results go back in input order.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        replies: list[Reply | None] = [None] * len(ids)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            seeds = [settings.seed_of(i) for i in idx] if settings.seeds else None
            for i, reply in zip(idx, self._generate([ids[i] for i in idx], [keys[i] for i in idx], settings, seeds)):
                replies[i] = reply
        return replies  # type: ignore[return-value]

    def _generate(
        self, rows: list[list[int]], keys: list[int], settings: GenerationSettings, seeds: list[int] | None = None
    ) -> list[Reply]:
        import torch

        tok = self.tokenizer
        t0 = time.perf_counter()
        device = self.model.device
        reuse = [self.kv.lookup(k, r) if self.prefix_cache else (0, None) for k, r in zip(keys, rows)]
        cached = [n for n, _ in reuse]
        C = max(cached)
        N = max(len(r) - c for r, c in zip(rows, cached))
        pad = tok.pad_token_id
        # Row layout: [pad, cached prefix | pad, new tokens]; masked pads get no position (positions
        # come from the mask's cumulative sum), so every real token keeps the position it had.
        input_ids = torch.full((len(rows), C + N), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), C + N), dtype=torch.long)
        for i, (r, c) in enumerate(zip(rows, cached)):
            input_ids[i, C - c : C] = torch.tensor(r[:c], dtype=torch.long)
            mask[i, C - c : C] = 1
            new = r[c:]
            input_ids[i, C + N - len(new) :] = torch.tensor(new, dtype=torch.long)
            mask[i, C + N - len(new) :] = 1
        kwargs: dict[str, Any] = dict(
            max_new_tokens=settings.max_tokens,
            pad_token_id=pad,
            do_sample=settings.temperature > 0,
            return_dict_in_generate=True,
        )
        kwargs["cache"] = self.kv.batch_cache(reuse, C + N + settings.max_tokens)
        if settings.temperature > 0 and seeds:  # sampled as greedy decoding of Gumbel-perturbed scores
            from transformers import LogitsProcessorList

            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                          logits_processor=LogitsProcessorList([RowSampler(seeds, settings.temperature, settings.top_p)]))  # fmt: skip
        elif settings.temperature > 0:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
        else:  # the model's generation_config may carry sampling defaults that greedy must not warn about
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if settings.stop:
            kwargs["stopping_criteria"] = self._stop_criteria(tuple(settings.stop))
        kwargs.update(settings.extra)
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(settings.seed)
            out = self.model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
        new = out.sequences[:, C + N :].tolist()
        stops = {t for t in (tok.eos_token_id, tok.pad_token_id) if t is not None}
        lengths = [next((i for i, t in enumerate(row) if t in stops), len(row)) for row in new]
        if self.prefix_cache and out.cache is not None:
            layers = [(layer.keys, layer.values) for layer in out.cache.layers]
            in_cache = layers[0][0].shape[2] - (C + N)  # generated tokens with keys/values (all but the last)
            for i, (r, key) in enumerate(zip(rows, keys)):
                # The prompt and the reply: the next turn re-sends the reply, so its tokens are
                # reused too, as far as re-tokenising the text gives the same ids. Positions:
                # the reused prefix [C - c, C), then the new prompt tokens and the reply.
                c, n = cached[i], min(lengths[i], in_cache)
                spans = [Span(layers, i, C - c, C), Span(layers, i, C + N - (len(r) - c), C + N + n)]
                self.kv.store(key, list(r) + new[i][:n], spans)
            self.kv.evict()
        self.kv.stats["prompt_tokens"] += sum(len(r) for r in rows)
        self.kv.stats["reused_tokens"] += sum(cached)
        elapsed = time.perf_counter() - t0
        replies = []
        for row, n, n_prompt in zip(new, lengths, (len(r) for r in rows)):
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

    def _stop_criteria(self, stop: tuple[str, ...]) -> Any:
        """Stop-string criteria, built once per set of strings: building them scans the whole
        vocabulary (~0.15 s for SmolLM2), longer than a short reply takes to generate."""
        from transformers import StoppingCriteriaList, StopStringCriteria

        if stop not in self._stops:
            self._stops[stop] = StoppingCriteriaList([StopStringCriteria(self.tokenizer, list(stop))])
        return self._stops[stop]


class EndpointError(RuntimeError):
    """The endpoint cannot serve at all: unreachable, wrong URL, unknown model, refused key."""


class OpenAIBackend:
    """Any OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, `transformers serve`).

    Up to `concurrency` requests are in flight at once. Transport faults are the `openai`
    client's to retry: 408, 409, 429 and 5xx answers, timeouts (`timeout` seconds a request),
    dropped connections, with exponential backoff and jitter, honouring `Retry-After` (in
    seconds, milliseconds or as a date). What the client takes for a success but is not, a
    malformed or empty answer, is retried here with the same kind of backoff. Both draw on
    one budget of `max_retries` per reply, and each reply counts the retries it took. A
    request the server refuses (400, 404, 422, ...) is not retried. A reply that still fails
    comes back with `error` set, never as an exception, so one bad request ends one chain,
    not the run.

    The API key is read from the environment variable `api_key_env` only; local servers
    need none. `hf_sampling` sends sampling through `transformers serve`'s
    `generation_config` field, which that server needs to sample at all (other servers
    reject the field).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        api_key_env: str = "OPENAI_API_KEY",
        hf_sampling: bool = False,
    ):
        from openai import OpenAI

        if concurrency < 1 or max_retries < 0 or not timeout > 0:
            raise ValueError("concurrency must be >= 1, max_retries >= 0 and timeout > 0")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.client = OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "none", timeout=timeout,
                             max_retries=max_retries)  # fmt: skip
        self._clients = {max_retries: self.client}  # the same client with less of the retry budget left
        self.base_url, self.model_id = base_url, model
        self.concurrency, self.max_retries = concurrency, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.api_key_env, self.hf_sampling = api_key_env, hf_sampling

    def check(self) -> list[str]:
        """Fail clearly now, not once per request: the endpoint answers and serves the model."""
        import openai

        try:
            served = [m.id for m in self.client.with_options(max_retries=1).models.list()]
        except openai.AuthenticationError as e:
            raise EndpointError(f"{self.base_url} refused the API key: set ${self.api_key_env} ({e})") from None
        except openai.APIConnectionError as e:
            raise EndpointError(f"cannot reach {self.base_url}: {e}. Is the server running, and is the URL right?") from None
        except openai.APIStatusError as e:
            raise EndpointError(f"{self.base_url}/models answered HTTP {e.status_code}: is this an OpenAI-compatible /v1 URL?") from None
        if served and self.model_id not in served:
            shown = ", ".join(served[:10]) + (" ..." if len(served) > 10 else "")
            raise EndpointError(f"{self.base_url} does not serve model {self.model_id!r}; it serves: {shown}")
        return served

    def chat(
        self, conversations: Sequence[list[Message]], settings: GenerationSettings, tools: list[dict] | None = None
    ) -> list[Reply]:
        """One reply per conversation; `concurrency` requests at a time."""
        jobs = [(c, settings, tools, settings.seed_of(i)) for i, c in enumerate(conversations)]
        if len(jobs) == 1 or self.concurrency == 1:
            return [self._request(*job) for job in jobs]
        with ThreadPoolExecutor(min(self.concurrency, len(jobs))) as pool:
            return list(pool.map(lambda job: self._request(*job), jobs))

    def _body(self, settings: GenerationSettings, tools: list[dict] | None, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = dict(max_tokens=settings.max_tokens, temperature=settings.temperature, seed=seed)
        if settings.temperature > 0:
            body["top_p"] = settings.top_p
        if settings.stop:
            body["stop"] = list(settings.stop)
        if tools:
            body["tools"] = tools
        extra = dict(settings.extra)
        if self.hf_sampling:
            config = {"max_new_tokens": settings.max_tokens, "do_sample": settings.temperature > 0}
            if settings.temperature > 0:
                config.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
            extra["generation_config"] = json.dumps(config)
        if extra:
            body["extra_body"] = extra
        return body

    def _request(self, conversation: list[Message], settings: GenerationSettings, tools: list[dict] | None, seed: int) -> Reply:
        import openai

        body = self._body(settings, tools, seed)
        t0 = time.perf_counter()
        retries = 0
        while True:
            left = self.max_retries - retries
            client = self._clients.get(left) or self._clients.setdefault(left, self.client.with_options(max_retries=left))
            try:
                raw = client.chat.completions.with_raw_response.create(model=self.model_id, messages=conversation, **body)
                retries += raw.retries_taken
                reply = _reply_from(raw.parse(), settings.stop)
                reply.latency_s, reply.retries = time.perf_counter() - t0, retries
                return reply
            except openai.APIStatusError as e:
                error = f"HTTP {e.status_code}: {_detail(e)}"
                if not _client_retries(e):
                    return Reply("", 0, 0, "error", latency_s=time.perf_counter() - t0, retries=retries, error=error)
                retries = self.max_retries  # the client spent what was left of the budget
                break
            except openai.APIConnectionError as e:  # timeouts too: retried by the client until the budget ran out
                error = f"{type(e).__name__}: {e}"
                retries = self.max_retries
                break
            except (openai.APIResponseValidationError, ValueError) as e:  # malformed or empty: ours to retry
                error = f"{type(e).__name__}: {e}"
                if retries >= self.max_retries:
                    break
                delay = min(self.max_backoff, self.backoff * 2**retries) * (0.75 + random.random() / 4)
                log.info("malformed answer (%s); retry %d in %.1fs", error, retries + 1, delay)
                time.sleep(delay)
                retries += 1
        error = f"gave up after {retries + 1} attempts; last: {error}"
        return Reply("", 0, 0, "error", latency_s=time.perf_counter() - t0, retries=retries, error=error)


def _client_retries(e: Any) -> bool:
    """Whether the openai client retries an HTTP error (it does for 408, 409, 429 and 5xx, unless told not to)."""
    headers = getattr(getattr(e, "response", None), "headers", None) or {}
    if headers.get("x-should-retry") in ("true", "false"):
        return headers.get("x-should-retry") == "true"
    return e.status_code in (408, 409, 429) or e.status_code >= 500


class MalformedReply(ValueError):
    """A response without a usable choice."""


def _reply_from(response: Any, stop: Sequence[str]) -> Reply:
    """A Reply from a chat completion; servers that ignore `stop` are cut here."""
    choices = getattr(response, "choices", None)
    if not choices or getattr(choices[0], "message", None) is None:
        raise MalformedReply("the response has no choice with a message")
    choice = choices[0]
    text = choice.message.content or ""
    cut = _cut_at_stop(text, stop)
    tool_calls = None
    if choice.message.tool_calls:
        tool_calls = [
            {"id": tc.id, "type": "function", "function": {"name": tc.function.name, "arguments": tc.function.arguments}}
            for tc in choice.message.tool_calls
        ]
    usage = getattr(response, "usage", None)
    finish = "stop" if cut is not None else (choice.finish_reason or "stop")
    return Reply(
        text=cut if cut is not None else text,
        prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
        completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
        finish_reason=finish,
        tool_calls=tool_calls,
    )


def _detail(e: Any) -> str:
    """The server's own explanation of an HTTP error, short."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        body = body.get("detail") or body.get("message") or body.get("error") or body
    return str(body or e.message)[:300]


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
