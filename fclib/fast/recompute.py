"""Layer recomputation that keeps the cache: less memory in training for more time, the same numbers.

Inside `recompute_layers(model)` each decoder layer, when gradients flow, keeps only its input
for the backward pass and runs its forward again there (activation checkpointing, per layer):
a training step then holds one layer's activations at a time instead of every layer's, for
about one more forward pass of the policy. transformers' own gradient checkpointing drops the
cache, because replaying a layer that writes its keys and values into it would write them
twice; prompt-prefix sharing (`prefix_sharing`) hands the shared prefix to the rows through
that cache, so under transformers' checkpointing it steps aside. Here the layer's cache entry
is put back as it was before the replay, so the replay computes what the forward pass did, to
the bit, and prefix sharing keeps working. It relies on the pinned transformers' `DynamicCache`
layers replacing (not changing in place) their keys and values on `update`; `check()` fails
loudly when that changes.
"""

from __future__ import annotations

from typing import Any

from fclib.fast.prefix_sharing import causal_lm


def check(config: Any) -> None:
    """Raise when the installed transformers' cache layers no longer replace their tensors on update."""
    import torch
    from transformers import DynamicCache

    try:
        layer = DynamicCache(config=config).layers[0]
        probe = torch.zeros(1, 1, 1, 1)
        layer.lazy_initialization(probe, probe)
        layer.update(probe, probe)
        first = layer.keys
        layer.update(probe, probe)
        ok = first.size(-2) == 1 and layer.keys.size(-2) == 2 and layer.keys is not first
    except (AttributeError, TypeError, IndexError):
        ok = False
    if not ok:
        raise RuntimeError(
            "layer recomputation builds on transformers' DynamicCache layers replacing their keys and values on "
            "update, which changed: set recompute_layers=false or pin the transformers of requirements.txt"
        )


class LayerRecompute:
    """Each decoder layer's activations recomputed in the backward pass, its cache entry restored first."""

    def __init__(self, model: Any):
        backbone = causal_lm(model).base_model
        check(backbone.config)
        self.layers = list(backbone.layers)

    def __enter__(self) -> LayerRecompute:
        for layer in self.layers:
            layer.forward = _Recomputed(layer, layer.forward)
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers:
            del layer.forward  # the instance attribute shadowed the class's forward


class _Recomputed:
    """A decoder layer's forward that, when gradients flow, keeps only its input and replays itself in backward."""

    def __init__(self, layer: Any, original: Any):
        self.layer, self.original = layer, original

    def __call__(self, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        import torch
        from torch.utils.checkpoint import checkpoint

        layer = self.layer
        if not (torch.is_grad_enabled() and layer.training) or getattr(layer, "gradient_checkpointing", False):
            return self.original(hidden_states, *args, **kwargs)
        cache = kwargs.get("cache")
        entry = cache.layers[layer.self_attn.layer_idx] if cache is not None else None
        state = dict(vars(entry)) if entry is not None else None

        def run(hidden: Any) -> Any:
            if entry is not None:  # the replay starts from the cache the forward pass started from
                entry.__dict__.update(state)
            return self.original(hidden, *args, **kwargs)

        return checkpoint(run, hidden_states, use_reentrant=False)


def recompute_layers(model: Any) -> LayerRecompute:
    """`with recompute_layers(model): trainer.train()`: each decoder layer recomputed in backward (`LayerRecompute`)."""
    return LayerRecompute(model)
