"""Where a run writes (`outputs/<run_name>/`, found from the project, never from the working directory),
how it writes a record, and how it shows progress."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TEXT_PROGRESS_ENV = "FCLIB_TEXT_PROGRESS"  # set by the pipeline: notebooks run headless show text bars


def outputs_root() -> Path:
    """$FCLIB_OUTPUTS, else the project's `outputs/` folder."""
    return Path(os.environ.get("FCLIB_OUTPUTS") or PROJECT_ROOT / "outputs")


def run_dir(run_name: str, create: bool = True) -> Path:
    """The folder of a run; the name must be a plain folder name."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", run_name or ""):
        raise ValueError(f"run_name {run_name!r} must be letters, digits, '.', '_' or '-' (no slashes)")
    path = outputs_root() / run_name
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def progress_bar(**kwargs: Any) -> Any:
    """A tqdm bar: a widget in Jupyter; plain text when $FCLIB_TEXT_PROGRESS is set (the pipeline sets it,
    so the bars of a headless run reach the terminal and the executed notebook as text)."""
    if os.environ.get(TEXT_PROGRESS_ENV):
        from tqdm.std import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm(**kwargs)


def jsonl_line(record: Any, **kwargs: Any) -> str:
    """One JSONL line for `record`, safe to write as UTF-8 whatever text a model or endpoint returned.

    Non-ASCII text stays readable (∀, é, ...); a record holding a string UTF-8 cannot encode (an
    unpaired surrogate such as the JSON escape \\udcff) is written with ASCII escapes instead, which
    `json.loads` reads back to the same string: lossless either way.
    """
    line = json.dumps(record, ensure_ascii=False, **kwargs)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record, ensure_ascii=True, **kwargs)
    return line + "\n"
