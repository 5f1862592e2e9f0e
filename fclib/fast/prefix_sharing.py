"""Prompt-prefix sharing: the prompt tokens that rows of a training batch share run once (a speed-up of training).

A DPO batch holds each pair twice (chosen, rejected) after the same prompt, and every prompt of
a task starts with the same ~820 tokens (system prompt, functions, demonstration), so on CPU
most of a step's compute went into the same tokens, many times over. See `shared_prompt_prefix`.
It replaces the backbone's `forward` for the length of a `with` block and relies on the pinned
transformers' `DynamicCache` layers (`lazy_initialization`, `keys`, `values`); `check()` fails
loudly when those change.
"""

from __future__ import annotations

from typing import Any


def check(config: Any) -> None:
    """Raise when the installed transformers' cache no longer has what prefix sharing builds on.

    The prefix's keys and values go into a `DynamicCache` built from the model's config, one
    layer per decoder layer, each filled by `lazy_initialization` and read back as `keys` and
    `values`.
    """
    import torch
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=config)
        layer = cache.layers[0]
        probe = torch.zeros(1, 1, 1, 1)
        layer.lazy_initialization(probe, probe)
        initialized = layer.is_initialized  # what forward checks before it uses the keys and values set below
        layer.keys, layer.values = probe, probe
        ok = initialized and len(cache.layers) == config.num_hidden_layers and cache.layers[0].keys is probe
    except (AttributeError, TypeError, IndexError) as e:
        ok, probe = False, e
    if not ok:
        raise RuntimeError(
            "prompt-prefix sharing builds on transformers' DynamicCache layers, which changed: "
            "set share_prompt_prefix=false or pin the transformers of requirements.txt"
        )


def causal_lm(model: Any) -> Any:
    """The causal LM itself, under a PEFT wrapper if there is one."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


Prefix = list[tuple[Any, Any]]  # per decoder layer: the keys and values of one row's first positions


class PrefixSharing:
    """Run the prompt prefixes that rows of a batch share once, not once per row; a context manager.

    A DPO batch holds each pair twice (chosen, rejected) after the same prompt, and every
    prompt of a task starts with the same ~820 tokens (system prompt, functions, demonstration),
    so on CPU most of a step's compute went into the same tokens, many times over. Inside the
    `with` block the backbone's `forward` is `PrefixSharing.forward`, which shares prefixes at
    every level, in three steps that call one another:

    1. `split`: group the rows by their next `min_tokens` tokens (first by task, next by pair).
    2. `shared`: for a group, compute its longest common prefix once, as one row, then `split`
       the rows' remainders on that prefix's keys and values.
    3. `tail`: what no two rows share runs as one batch on the expanded keys and values.

    Each group is cut to its longest row, so padding is not computed either. In DPO's reference
    pass (adapters off, no gradients) the task prefixes are those of the frozen base: computed
    once for the whole block (all of training) and kept in `frozen`. The hidden states of every
    non-padding position are the same as the backbone's own, and so, through the expansion,
    are the gradients (tests/test_train.py checks both). Calls with a cache or embeddings
    (generation) and gradient checkpointing (4-bit on CUDA) take the backbone's own path. Under
    dropout a shared prefix would draw one mask for all its rows; TRL's DPOConfig disables
    dropout by default.
    """

    def __init__(self, model: Any, min_tokens: int = 16):
        self.backbone = causal_lm(model).base_model
        check(self.backbone.config)
        self.min_tokens = min_tokens
        self.original = self.backbone.forward
        self.lora = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "disable_adapters")]
        self.frozen: dict[tuple[int, ...], tuple[Any, Prefix]] = {}  # task prefix -> hidden states, keys/values

    def __enter__(self) -> PrefixSharing:
        self.backbone.forward = self.forward
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.backbone.forward  # the instance attribute shadowed the class's forward

    def forward(self, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:
        """The backbone's forward, sharing prefixes when the batch is a plain one whose rows start alike."""
        import torch
        from transformers.modeling_outputs import BaseModelOutputWithPast

        backbone, n = self.backbone, self.min_tokens
        plain = all(kwargs.get(k) is None for k in ("cache", "inputs_embeds", "position_ids"))
        checkpointing = backbone.training and backbone.is_activation_checkpointing
        if not plain or input_ids is None or input_ids.dim() != 2 or checkpointing:
            return self.original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        first = [(tuple(ids), all(m)) for ids, m in zip(input_ids[:, :n].tolist(), mask[:, :n].tolist())]
        if len({ids for ids, full in first if full}) == sum(full for _, full in first):  # no two rows start alike
            return self.original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("use_cache", "cache")}  # None here (cache=None)
        return BaseModelOutputWithPast(last_hidden_state=self.split(input_ids, mask, [], kwargs))

    def split(self, ids: Any, mask: Any, prefix: Prefix, kwargs: dict) -> Any:
        """Hidden states after the prefix: rows grouped by their next `min_tokens` tokens, each group run apart."""
        import torch
        import torch.nn.functional as F

        start = prefix[0][0].size(-2) if prefix else 0
        window = slice(start, start + self.min_tokens)
        groups: dict[Any, list[int]] = {}
        for row, (w, m) in enumerate(zip(ids[:, window].tolist(), mask[:, window].tolist())):
            groups.setdefault(tuple(w) if len(m) == self.min_tokens and all(m) else None, []).append(row)
        alone = groups.pop(None, [])
        alone += [rows[0] for rows in groups.values() if len(rows) == 1]
        runs = [(rows, self.shared) for rows in groups.values() if len(rows) > 1]
        if alone:
            runs.append((alone, self.tail))
        parts, order = [], []
        for rows, run in runs:
            length = int(mask[rows].sum(1).max())
            hidden = run(ids[rows, :length], mask[rows, :length], prefix, kwargs)
            parts.append(F.pad(hidden, (0, 0, 0, ids.size(1) - length)))  # padding positions: zeros, masked downstream
            order += rows
        return torch.cat(parts)[torch.tensor(order).argsort()]

    def shared(self, ids: Any, mask: Any, prefix: Prefix, kwargs: dict) -> Any:
        """Hidden states after the prefix of rows sharing their next tokens: their common part once, then the rest."""
        import torch
        from transformers import DynamicCache

        start = prefix[0][0].size(-2) if prefix else 0
        same = (ids == ids[:1]).all(0) & mask.bool().all(0)
        n = min(int(same.long().cumprod(0).sum()), int(mask.sum(1).min()) - 1)  # every row keeps a token after it
        if n - start < self.min_tokens:
            return self.tail(ids, mask, prefix, kwargs)
        reuse = not prefix and self.reference_pass()
        if reuse:
            first = ids[0, :n].tolist()
            hit = max((k for k in self.frozen if len(k) <= n and list(k) == first[: len(k)]), key=len, default=None)
            if hit is not None:
                head, kv = self.frozen[hit]
                rest = (self.shared if n - len(hit) >= self.min_tokens else self.split)(ids, mask, kv, kwargs)
                return torch.cat([head.expand(ids.size(0), -1, -1), rest], 1)
        cache = self.cache(prefix, 1) if prefix else DynamicCache(config=self.backbone.config)
        head = self.original(input_ids=ids[:1, start:n], cache=cache, use_cache=True, **kwargs).last_hidden_state
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        if reuse:
            self.frozen[tuple(first)] = (head, kv)
            while len(self.frozen) > 8:  # one or two per task in practice
                del self.frozen[next(iter(self.frozen))]
        return torch.cat([head.expand(ids.size(0), -1, -1), self.split(ids, mask, kv, kwargs)], 1)

    def tail(self, ids: Any, mask: Any, prefix: Prefix, kwargs: dict) -> Any:
        """Hidden states after the prefix, no further sharing: one batch."""
        if not prefix:
            return self.original(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state
        start = prefix[0][0].size(-2)
        cache = self.cache(prefix, ids.size(0))
        return self.original(
            input_ids=ids[:, start:], attention_mask=mask, cache=cache, use_cache=True, **kwargs
        ).last_hidden_state

    def cache(self, prefix: Prefix, rows: int) -> Any:
        """A cache holding the prefix's keys and values, expanded (not copied) to `rows` rows."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.backbone.config)
        for layer, (keys, values) in zip(cache.layers, prefix, strict=True):
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1)
        return cache

    def reference_pass(self) -> bool:
        """Adapters off and no gradients (DPO's reference pass): the frozen base's prefixes are reused across calls."""
        import torch

        return bool(self.lora) and not torch.is_grad_enabled() and all(m.disable_adapters for m in self.lora)


def shared_prompt_prefix(model: Any, min_tokens: int = 16) -> PrefixSharing:
    """`with shared_prompt_prefix(model): ...` runs the prompt prefixes rows of a batch share once (`PrefixSharing`)."""
    return PrefixSharing(model, min_tokens)
