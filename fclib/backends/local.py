"""The local backend: a transformers causal LM generating for a batch of conversations at once."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import llguidance
import numpy as np

from fclib.backends import GenerationSettings, Message, Reply, cut_at_stop
from fclib.fast.kv_cache import PrefixCache, Span, use_gqa_sdpa
from fclib.models import load_model


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


class GrammarMask:
    """A logits processor that keeps each row to the tokens its grammar allows next (llguidance).

    One matcher per row, built from the row's grammar (Lark, `Toolset.grammar`); a row without a
    grammar is left alone. Each step the matcher takes the token the row generated last and
    computes the mask of the next one: everything else gets -inf before any sampling, so the
    row can only write a string of the grammar and then its end-of-text token. `seconds` and
    `steps` count the time spent on matchers and masks, for the cost per token.
    """

    def __init__(self, tokenizer: Any, grammars: Sequence[str | None]) -> None:
        self.matchers = [
            llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_lark(g), log_level=0) if g else None
            for g in grammars
        ]
        for m in self.matchers:
            if m is not None and m.is_error():
                raise ValueError(f"the grammar does not compile: {m.get_error()}")
        self.started = False
        self.seconds, self.steps = 0.0, 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        t0 = time.perf_counter()
        if self.started:  # the token each row generated last (rows that ended get padding: not consumed)
            for m, token in zip(self.matchers, input_ids[:, -1].tolist()):
                if m is not None and not m.is_stopped():
                    m.consume_token(token)
        self.started = True
        vocab = scores.shape[-1]
        allowed = torch.ones(scores.shape, dtype=torch.bool)
        for i, m in enumerate(self.matchers):
            if m is not None and not m.is_error():
                bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
                row = np.zeros(vocab, dtype=bool)
                row[: min(vocab, len(bits))] = bits[:vocab].astype(bool)
                allowed[i] = torch.from_numpy(row)
        self.seconds += time.perf_counter() - t0
        self.steps += 1
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))


class LocalBackend:
    """A transformers causal LM generating for a batch of conversations at once.

    With `prefix_cache` (the default) each turn computes only its new tokens: the keys and
    values of each conversation's earlier turns, and the prompt prefix its task's chains
    share, are kept and reused (`fclib.fast.kv_cache`); rows of one batch may reuse caches of
    different lengths. Reuse is decided on token ids alone, so it changes how much is
    computed, never what. `cache_tokens` bounds the memory it keeps, in row positions. On
    CPU, a model with grouped key/value heads is switched to an SDPA attention that gives the
    same output without copying those heads (`kv_cache.use_gqa_sdpa`).

    Given one grammar per conversation (`GenerationSettings.grammars`), each reply is decoded
    under its grammar (`GrammarMask`): constrained decoding.
    """

    constrained_decoding = True

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
        self._grammar_tokenizer: Any = None  # llguidance's view of the vocabulary, built on first use (~1 s)
        self.grammar_stats = {"seconds": 0.0, "steps": 0}  # time GrammarMask spent, over decoding steps

    @classmethod
    def load(cls, name: str, batch_size: int = 16, prefix_cache: bool = True, **kwargs: Any) -> LocalBackend:
        """A backend for the embedded model, a local folder or a hub id (`kwargs` go to `load_model`)."""

        model, tokenizer = load_model(name, **kwargs)
        return cls(model, tokenizer, model_id=str(name), batch_size=batch_size, prefix_cache=prefix_cache)

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

    def forget(self, conversations: Sequence[list[Message]]) -> None:
        """Drop the keys and values kept for conversations that will not be sent again (their chains ended)."""
        for c in conversations:
            self.kv.forget(id(c))

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
            grammars = [settings.grammars[i] for i in idx] if settings.grammars else None
            rows, row_keys = [ids[i] for i in idx], [keys[i] for i in idx]
            for i, reply in zip(idx, self._generate(rows, row_keys, settings, seeds, grammars)):
                replies[i] = reply
        return replies  # type: ignore[return-value]

    def _generate(
        self,
        rows: list[list[int]],
        keys: list[int],
        settings: GenerationSettings,
        seeds: list[int] | None = None,
        grammars: list[str | None] | None = None,
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
        processors: list[Any] = []
        if grammars and any(grammars):  # the grammar's mask comes first: sampling sees only allowed tokens
            processors.append(GrammarMask(self.grammar_tokenizer(), grammars))
        if settings.temperature > 0 and seeds:  # sampled as greedy decoding of Gumbel-perturbed scores
            processors.append(RowSampler(seeds, settings.temperature, settings.top_p))
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        elif settings.temperature > 0:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
        else:  # the model's generation_config may carry sampling defaults that greedy must not warn about
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if settings.stop:
            kwargs["stopping_criteria"] = self._stop_criteria(tuple(settings.stop))
        if processors:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList(processors)
        kwargs.update(settings.extra)
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(settings.seed)
            out = self.model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
        if processors and isinstance(processors[0], GrammarMask):
            self.grammar_stats["seconds"] += processors[0].seconds
            self.grammar_stats["steps"] += processors[0].steps
        new = out.sequences[:, C + N :].tolist()
        stops = {t for t in (tok.eos_token_id, tok.pad_token_id) if t is not None}
        lengths = [next((i for i, t in enumerate(row) if t in stops), len(row)) for row in new]
        if self.prefix_cache and settings.remember and out.cache is not None:
            layers = [(layer.keys, layer.values) for layer in out.cache.layers]
            in_cache = layers[0][0].shape[2] - (C + N)  # generated tokens with keys/values (all but the last)
            for i, (r, key) in enumerate(zip(rows, keys)):
                # The prompt and the reply: the next turn re-sends the reply, so its tokens are
                # reused too, as far as re-tokenising the text gives the same ids. The reused prefix
                # is kept as the spans it came from; the new prompt tokens and the reply are copied.
                c, n = cached[i], min(lengths[i], in_cache)
                own = Span(layers, i, C + N - (len(r) - c), C + N + n)
                self.kv.store(key, list(r) + new[i][:n], reuse[i][1], c, own)
            self.kv.evict()
        self.kv.stats["prompt_tokens"] += sum(len(r) for r in rows)
        self.kv.stats["reused_tokens"] += sum(cached)
        elapsed = time.perf_counter() - t0
        replies = []
        for row, n, n_prompt in zip(new, lengths, (len(r) for r in rows)):
            ended = n < len(row)
            text = tok.decode(row[:n], skip_special_tokens=True)
            cut = cut_at_stop(text, settings.stop)
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

    def grammar_tokenizer(self) -> Any:
        """The tokenizer as llguidance sees it (as `llguidance.hf.from_tokenizer` builds it, without importing
        transformers here), built once: it reads the whole vocabulary."""
        if self._grammar_tokenizer is None:
            fast = copy.copy(self.tokenizer.backend_tokenizer)  # a fast (Rust) tokenizer; padding and truncation off
            fast.no_padding()
            fast.no_truncation()
            self._grammar_tokenizer = llguidance.LLTokenizer(fast.to_str(), eos_token=self.tokenizer.eos_token_id)
        return self._grammar_tokenizer

    def _stop_criteria(self, stop: tuple[str, ...]) -> Any:
        """Stop-string criteria, built once per set of strings: building them scans the whole
        vocabulary (~0.15 s for SmolLM2), longer than a short reply takes to generate."""
        from transformers import StoppingCriteriaList, StopStringCriteria

        if stop not in self._stops:
            self._stops[stop] = StoppingCriteriaList([StopStringCriteria(self.tokenizer, list(stop))])
        return self._stops[stop]
