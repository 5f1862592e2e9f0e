"""Reusing attention keys and values across the turns and chains of the local backend.

An agent re-sends the whole conversation every turn: ~900 prompt tokens for a ~15-token call,
and every chain of a task starts with the same ~800 tokens (system message, demonstration).
`PrefixCache` keeps what was computed so that each turn computes only its new tokens:

- per conversation, the keys/values of its prompt *and* of the reply just generated (the next
  turn re-sends that reply);
- per task, the prefix that new conversations share, computed once (`share_prefixes`).

Reuse is decided on token ids alone (the longest common prefix), so it changes how much is
computed, never what. Entries are copies of their conversation's own positions (a view would
keep its whole padded batch alive); a conversation is forgotten when its chain ends, a prompt
sent once is never kept (`GenerationSettings.remember`), and the memory bound (`max_tokens`,
in row positions) drops the least recently used conversations first.

Two CPU costs of transformers' generation loop are avoided as well: `batch_cache` allocates
each layer's keys/values once per call with room for the whole reply (`DynamicLayer`
concatenates a new, longer tensor at every step), and `use_gqa_sdpa` lets a padded prefill
read grouped key/value heads without copying them to every query head.
"""

from __future__ import annotations

import functools
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Layers = list[tuple[Any, Any]]  # per layer: keys and values, (batch, heads, positions, head_dim)


@dataclass
class Span:
    """Positions [start, stop) of one row of a batch's key/value tensors."""

    layers: Layers
    row: int
    start: int
    stop: int


@dataclass
class Cached:
    """The keys/values of a token sequence, as spans of batch tensors, in order."""

    ids: Sequence[int]
    spans: list[Span]

    def write(self, n: int, layer: int, part: int, dest: Any) -> None:
        """Copy the first n positions of one layer's keys (part 0) or values (part 1) to `dest`,
        a (heads, n, head_dim) tensor."""
        at = 0
        for s in self.spans:
            take = min(s.stop - s.start, n - at)
            if take <= 0:
                break
            dest[:, at : at + take] = s.layers[layer][part][s.row, :, s.start : s.start + take]
            at += take

    def head(self, n: int) -> list[Span]:
        """The spans of the first n positions."""
        out, at = [], 0
        for s in self.spans:
            take = min(s.stop - s.start, n - at)
            if take <= 0:
                break
            out.append(Span(s.layers, s.row, s.start, s.start + take))
            at += take
        return out

    def storages(self) -> dict[int, int]:
        """The batch tensors this entry keeps alive: storage address -> size in row positions."""
        out = {}
        for s in self.spans:
            k = s.layers[0][0]
            out[k.untyped_storage().data_ptr()] = k.untyped_storage().nbytes() // (
                k.shape[1] * k.shape[3] * k.element_size()
            )
        return out


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """Keys/values of conversations (keyed by the caller) and of shared prompt prefixes."""

    SHARED_MIN_TOKENS = 64  # a shorter common prefix is not worth a pass of its own
    SHARED_ENTRIES = 8  # shared prefixes kept (one or two per task in practice)

    def __init__(self, model: Any, max_tokens: int = 150_000):
        self.model, self.max_tokens = model, max_tokens
        self.entries: OrderedDict[int, Cached] = OrderedDict()
        self.shared: OrderedDict[tuple[int, ...], Cached] = OrderedDict()
        self.stats = {"prompt_tokens": 0, "reused_tokens": 0, "shared_prefill_tokens": 0}

    def clear(self) -> None:
        self.entries.clear()
        self.shared.clear()

    def lookup(self, key: int | None, ids: Sequence[int]) -> tuple[int, Cached | None]:
        """How many leading tokens of `ids` have cached keys/values (the conversation's own
        entry or a shared prefix, whichever covers more), and that entry. At least one token
        is always left to compute, for the next token's logits."""
        candidates = [self.entries[key]] if key in self.entries else []
        best, found = 0, None
        for entry in candidates + list(self.shared.values()):
            n = min(common_prefix(entry.ids, ids), len(ids) - 1)
            if n > best:
                best, found = n, entry
        return best, found

    def share_prefixes(self, rows: Sequence[Sequence[int]]) -> None:
        """Compute once the prefix that new conversations share (system message, demonstration),
        so that each of them computes only its own tokens."""
        import torch

        groups: dict[tuple[int, ...], list[Sequence[int]]] = {}
        for r in rows:
            if self.lookup(None, r)[0] < len(r) // 2:
                groups.setdefault(tuple(r[: self.SHARED_MIN_TOKENS]), []).append(r)
        for group in groups.values():
            if len(group) < 2:
                continue
            n = min(min(common_prefix(group[0], r) for r in group[1:]), min(len(r) for r in group) - 1)
            if n < self.SHARED_MIN_TOKENS:
                continue
            prefix = tuple(group[0][:n])
            with torch.inference_mode():
                out = self.model(
                    input_ids=torch.tensor([prefix], device=self.model.device), use_cache=True, logits_to_keep=1
                )
            layers = [(layer.keys, layer.values) for layer in out.cache.layers]
            self.shared[prefix] = Cached(prefix, [Span(layers, 0, 0, n)])
            self.stats["shared_prefill_tokens"] += n
            while len(self.shared) > self.SHARED_ENTRIES:
                self.shared.popitem(last=False)

    def batch_cache(self, reuse: list[tuple[int, Cached | None]], capacity: int) -> Any:
        """A transformers cache for one batch: row i's first n_i reused positions right-aligned
        in the first C = max n_i positions (zeros, masked, before them). For plain attention
        layers the tensors have room for `capacity` positions, the whole call."""
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        config = self.model.config
        cache = DynamicCache(config=config)
        plain = all(type(layer) is DynamicLayer for layer in cache.layers)
        C = max(n for n, _ in reuse)
        template = next((entry for _, entry in reuse if entry is not None), None)
        if template is None:
            if plain:
                cache.layers = [buffer_layer()(capacity) for _ in cache.layers]
            return cache
        layers = []
        for layer, kv in enumerate(template.spans[0].layers):
            pair = []
            for part, t in enumerate(kv):
                shape = (len(reuse), t.shape[1], capacity if plain else C, t.shape[3])
                buf = torch.empty(shape, dtype=t.dtype, device=t.device)
                for i, (n, entry) in enumerate(reuse):
                    buf[i, :, : C - n] = 0
                    if entry is not None and n > 0:
                        entry.write(n, layer, part, buf[i, :, C - n : C])
                pair.append(buf)
            layers.append(tuple(pair))
        if not plain:  # sliding-window and other special layers: transformers' own, filled with the data
            return DynamicCache(ddp_cache_data=layers, config=config)
        cache.layers = [buffer_layer()(capacity, keys, values, C) for keys, values in layers]
        return cache

    def store(self, key: int, ids: Sequence[int], reused: Cached | None, n_reused: int, new: Span) -> None:
        """Remember a conversation's tokens: the `n_reused` leading positions it reused from `reused`, kept as the
        spans they are (a shared prefix stays shared by every conversation that starts with it), then its new
        positions copied out of the batch tensor they were computed in. A view of that tensor would keep the
        whole padded batch alive: every row, its padding and its unused room."""
        spans = reused.head(n_reused) if reused is not None else []
        if new.stop > new.start:
            own = [
                (
                    k[new.row : new.row + 1, :, new.start : new.stop].clone(),
                    v[new.row : new.row + 1, :, new.start : new.stop].clone(),
                )
                for k, v in new.layers
            ]
            spans.append(Span(own, 0, 0, new.stop - new.start))
        if spans:
            self.entries[key] = Cached(list(ids), spans)
            self.entries.move_to_end(key)

    def forget(self, key: int) -> None:
        """Drop a conversation that will not be sent again (its chain ended)."""
        self.entries.pop(key, None)

    def evict(self) -> None:
        """Drop the least recently used conversations until the batch tensors they keep alive
        fit in `max_tokens` row positions."""
        size: dict[int, int] = {}
        refs: Counter[int] = Counter()
        for entry in self.entries.values():
            for ptr, n in entry.storages().items():
                size[ptr] = n
                refs[ptr] += 1
        total = sum(size.values())
        while self.entries and total > self.max_tokens:
            _, entry = self.entries.popitem(last=False)
            for ptr in entry.storages():
                refs[ptr] -= 1
                if refs[ptr] == 0:
                    total -= size[ptr]


@functools.cache
def buffer_layer() -> type:
    """A transformers `DynamicLayer` that writes new keys/values into tensors allocated once per
    call, instead of concatenating a new, longer tensor at every step: on CPU those copies
    (and the fresh memory pages each one touches) cost about as much as attention itself.
    Defined on first use so that importing fclib does not import transformers."""
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        def __init__(self, capacity: int, keys: Any = None, values: Any = None, length: int = 0):
            super().__init__()
            self.capacity = capacity
            if keys is not None:
                self._view(keys, values, length)

        def _view(self, keys: Any, values: Any, length: int) -> None:
            self._kbuf, self._vbuf, self._length = keys, values, length
            self.keys, self.values = self._own = keys[:, :, :length], values[:, :, :length]
            self.device, self.is_initialized = keys.device, True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            n = key_states.shape[-2]
            if not self.is_initialized:
                shape = (*key_states.shape[:2], max(self.capacity, n), key_states.shape[3])
                self._view(key_states.new_empty(shape), value_states.new_empty(shape), 0)
            end = self._length + n
            ours = self.keys is self._own[0] and self.values is self._own[1]
            if end > self._kbuf.shape[-2] or not ours:  # out of room, or replaced by a cache operation
                return super().update(key_states, value_states, *args, **kwargs)
            self._kbuf[:, :, self._length : end] = key_states
            self._vbuf[:, :, self._length : end] = value_states
            self._view(self._kbuf, self._vbuf, end)
            return self.keys, self.values

    return BufferLayer


_GQA_SDPA = "fclib_gqa_sdpa"


def use_gqa_sdpa(model: Any) -> None:
    """Let SDPA read grouped key/value heads as they are when a padding mask is given.

    transformers' SDPA path copies each key/value head to every query head of its group
    (`repeat_kv`) whenever there is an attention mask, except on some accelerators. A padded
    batch prefill over a ~900-token cache then spends much of its time in those copies: on
    CPU, torch's SDPA with `enable_gqa=True` gives the same output about 4x faster (measured
    for SmolLM2's 9 query / 3 key-value heads). Models without grouped heads, on another
    device or on another attention implementation are left as they are.
    """
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa" or model.device.type != "cpu":
        return
    heads, kv_heads = getattr(config, "num_attention_heads", 0), getattr(config, "num_key_value_heads", 0)
    if not heads or not kv_heads or heads == kv_heads:
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(_GQA_SDPA, _gqa_sdpa_forward)
    AttentionMaskInterface.register(_GQA_SDPA, sdpa_mask)
    model.set_attn_implementation(_GQA_SDPA)


def _gqa_sdpa_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' SDPA attention, except that a masked multi-token query reads grouped heads directly."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    special = kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
    if attention_mask is None or query.shape[2] == 1 or special:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None
