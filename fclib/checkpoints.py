"""A training's checkpoints: which one a rerun may resume, and when the training is already done.

A training is known by its fingerprint: the settings that decide its weights and the content of the
pairs it trains on. The fingerprint is written beside the checkpoints (`fingerprint.json`) before
training starts and into the adapter's record (`fclib_training.json`) after it ends, so that a rerun

- finds a finished training with the same fingerprint finished, and trains nothing;
- resumes only from checkpoints made with the same fingerprint: others (other settings, other pairs,
  or a folder from before fingerprints) are set aside whole, and training starts afresh;
- resumes from the last *complete* checkpoint: one cut short by a kill (its `trainer_state.json`,
  written last, missing or unreadable, or a file it needs gone) is set aside, never resumed from;
- takes a complete checkpoint at the last step as the training's result, without another step.

Nothing is deleted: what is set aside goes to `model/set-aside/`, named by when.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from fclib import runs

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"
STATE = "trainer_state.json"  # written last into a checkpoint by transformers' Trainer
NEEDED = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt")  # what resuming reads besides the state
PAIR_FILES = ("train.jsonl", "validation.jsonl")  # what training reads of the pairs (fclib.pairs.load_pairs)


def fingerprint(settings: dict[str, Any], pairs_dir: str | Path, weightless: tuple[str, ...] = ()) -> dict[str, Any]:
    """What decides a training's weights: `settings` but the `weightless` ones, and the pair files' digest."""
    digest = hashlib.sha256()
    for name in PAIR_FILES:
        path = Path(pairs_dir) / name
        digest.update(f"{name}\0".encode() + (path.read_bytes() if path.is_file() else b"-") + b"\0")
    kept = {k: v for k, v in json.loads(json.dumps(settings)).items() if k not in weightless}
    return {"settings": kept, "pairs": digest.hexdigest()}


def finished(adapter_dir: str | Path, mark: dict[str, Any]) -> dict[str, Any] | None:
    """The record (`fclib_training.json`) of a finished training with fingerprint `mark` in `adapter_dir`, or None."""
    adapter_dir = Path(adapter_dir)
    try:
        record = runs.read_mapping(adapter_dir / "fclib_training.json")
    except runs.UnreadableFile:
        return None
    if not record or record.get("fingerprint") != mark or not (adapter_dir / NEEDED[0]).is_file():
        return None
    return record


def state(checkpoint: str | Path) -> dict[str, Any] | None:
    """The trainer state of a complete checkpoint, or None when it is not one (cut short, or its files gone)."""
    checkpoint = Path(checkpoint)
    try:
        found = runs.read_mapping(checkpoint / STATE)
    except runs.UnreadableFile:
        return None
    if not found or "global_step" not in found or not all((checkpoint / name).is_file() for name in NEEDED):
        return None
    return found


def resumable(checkpoints: str | Path, mark: dict[str, Any], writer: bool = True) -> Path | None:
    """The checkpoint a training with fingerprint `mark` resumes from, or None to start afresh.

    Checkpoints of another fingerprint are set aside as a whole, incomplete ones one by one (`writer`: this
    process moves them; other processes of the same training only choose). Then `mark` is recorded.
    """
    checkpoints = Path(checkpoints)
    if checkpoints.is_dir():
        try:
            theirs = runs.read_mapping(checkpoints / FINGERPRINT)
        except runs.UnreadableFile:
            theirs = None
        if theirs != mark:
            if writer:
                why = "; ".join(runs.differences(theirs or {}, mark)) or "no fingerprint"
                _set_aside(checkpoints, checkpoints.parent, f"trained with other settings or pairs ({why[:500]})")
            return None
    candidates = sorted(
        (p for p in checkpoints.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    usable = None
    for checkpoint in candidates:
        if state(checkpoint) is not None:
            usable = checkpoint
        elif writer:
            _set_aside(checkpoint, checkpoints.parent, "cut short (no complete trainer_state.json, or a file missing)")
    if writer:
        runs.write_json(checkpoints / FINGERPRINT, mark)
    return usable


def set_aside_all(checkpoints: str | Path) -> None:
    """Move a checkpoints folder aside (a training asked not to resume)."""
    if Path(checkpoints).is_dir():
        _set_aside(Path(checkpoints), Path(checkpoints).parent, "a fresh training was asked for (resume=False)")


def _set_aside(path: Path, model_dir: Path, why: str) -> None:
    """Move `path` into `<model_dir>/set-aside/`, named by when, saying why."""
    aside = model_dir / "set-aside"
    aside.mkdir(parents=True, exist_ok=True)
    stamp = f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    target = next(aside / f"{stamp}-{n}" for n in range(1, 10**6) if not (aside / f"{stamp}-{n}").exists())
    os.replace(path, target)
    log.warning("%s: %s; set aside in %s", path, why, target)
