"""Completion-only scoring: TRL's compact log-probability indexing on every device (a speed-up of training).

TRL computes each sequence's log-probabilities with a chunked LM-head kernel. On CUDA it feeds
the kernel only the positions whose labels count (the completion); elsewhere it feeds every
position (the whole prompt and the padding) and masks the result afterwards, a choice made for
devices that recompile on every new shape. On CPU that is the prompt's ~900 tokens times the
vocabulary for a ~12-token completion. `completion_only_scoring` selects TRL's compact indexing
on every device: same loss and gradients (tests/test_train.py), far less work.

It relies on a private function of the pinned TRL, `trl.trainer.utils._use_triton`, read by the
fused forward only to choose that indexing; `check()` fails loudly when TRL no longer has it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

PATCHED = "trl.trainer.utils._use_triton"


def readers() -> list[str]:
    """The functions of `trl.trainer.utils` that look up `_use_triton` when they run (nested functions included)."""
    import trl.trainer.utils as trl_utils

    def reads(code: object) -> bool:
        return "_use_triton" in code.co_names or any(reads(c) for c in code.co_consts if inspect.iscode(c))

    return [
        name
        for name, f in inspect.getmembers(trl_utils, inspect.isfunction)
        if f.__module__ == trl_utils.__name__ and reads(f.__code__)
    ]


def check() -> None:
    """Raise when the installed TRL no longer reads what the patch replaces (the patch would then silently do nothing).

    The patch swaps the module global `_use_triton` of `trl.trainer.utils`; it takes effect only
    while a function of that module looks the name up when it runs.
    """
    import trl.trainer.utils as trl_utils

    if not callable(getattr(trl_utils, "_use_triton", None)) or not readers():
        raise RuntimeError(
            f"completion-only scoring patches {PATCHED}, which this TRL no longer has or reads: "
            "set completion_only_scoring=false or pin the TRL of requirements.txt"
        )


@contextmanager
def completion_only_scoring() -> Iterator[None]:
    """Inside the block, TRL scores only the completion tokens, on CPU too."""
    import trl.trainer.utils as trl_utils

    check()
    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: True  # read by the fused forward only to choose the compact indexing
    try:
        yield
    finally:
        trl_utils._use_triton = original
