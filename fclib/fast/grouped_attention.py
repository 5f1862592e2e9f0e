"""Grouped key/value attention in training: each key/value head is read where it is, not copied per query head.

SmolLM2 (like most current models) has fewer key/value heads than query heads (3 against 9).
transformers' `sdpa` attention copies each key/value head once per query head (`repeat_kv`)
before calling PyTorch's `scaled_dot_product_attention`, except on the devices it knows to
support grouped heads with a mask; on CPU the copies are made, and autograd keeps them for
the backward pass: in a `cpu` training step, 0.6 GiB of the 3.3 GiB the forward pass keeps.
PyTorch's CPU attention takes grouped heads with a mask (`enable_gqa=True`), and
transformers asks it to when `TRANSFORMERS_SDPA_FORCE_GQA=1`, which `grouped_kv_attention`
sets for the length of a `with` block. The loss is the same to the last bit; the gradients
of the key/value projections are summed over their query heads inside the kernel instead of
after the copies, so they differ in the last bits (tests/test_train.py). `check()` fails
loudly when the pinned transformers no longer reads the variable.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager

VARIABLE = "TRANSFORMERS_SDPA_FORCE_GQA"


def check() -> None:
    """Raise when the installed transformers no longer reads `TRANSFORMERS_SDPA_FORCE_GQA` in its sdpa attention."""
    from transformers.integrations import sdpa_attention

    decide = getattr(sdpa_attention, "use_gqa_in_sdpa", None)
    if decide is None or VARIABLE not in inspect.getsource(decide):
        raise RuntimeError(
            f"grouped key/value attention sets {VARIABLE}, which this transformers no longer reads: "
            "set grouped_kv_attention=false or pin the transformers of requirements.txt"
        )


@contextmanager
def grouped_kv_attention() -> Iterator[None]:
    """Inside the block, sdpa attention reads grouped key/value heads without copying them (see the module)."""
    check()
    before = os.environ.get(VARIABLE)
    os.environ[VARIABLE] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[VARIABLE]
        else:
            os.environ[VARIABLE] = before
