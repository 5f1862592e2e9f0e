"""Where a run writes (`outputs/<run_name>/`, found from the project, never from the working directory),
how it writes and reads a record, and how it shows progress."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as text_tqdm

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TEXT_PROGRESS_ENV = "FCLIB_TEXT_PROGRESS"  # set by the pipeline: notebooks run headless show text bars


def outputs_root() -> Path:
    """$FCLIB_OUTPUTS, else the project's `outputs/` folder."""
    return Path(os.environ.get("FCLIB_OUTPUTS") or PROJECT_ROOT / "outputs")


def run_folder(run_name: str, create: bool = True) -> Path:
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
    return (text_tqdm if os.environ.get(TEXT_PROGRESS_ENV) else auto_tqdm)(**kwargs)


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


class BadLine(ValueError):
    """A line of a JSONL file that cannot be used; the message names the file, the line and what is wrong."""


def read_record(raw: bytes, convert: Callable[[Any], Any] | None = None) -> Any:
    """The record of one JSONL line: UTF-8, JSON, then `convert` (which checks it; ValueError names a bad field)."""
    record = json.loads(raw.decode("utf-8"))
    return convert(record) if convert is not None else record


def check_fields(record: Any, fields: dict[str, type], what: str = "a record") -> dict[str, Any]:
    """`record` when it is a JSON object holding each of `fields` with its type; else ValueError naming the field."""
    if not isinstance(record, dict):
        raise ValueError(f"{what} is a JSON object, not {type(record).__name__}")
    for name, kind in fields.items():
        if name not in record:
            raise ValueError(f"field {name!r} is missing")
        value = record[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ValueError(
                f"field {name!r} must be {kind.__name__}, not {type(value).__name__} ({str(value)[:40]!r})"
            )
    return record


def check_messages(messages: list[Any], where: str) -> None:
    """ValueError unless every message is an object with string `role` and `content`."""
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{where} message {i} must be an object with string role and content")


def fault_of(e: BaseException) -> str:
    """What is wrong with a line, in words, from the error `read_record` raised."""
    if isinstance(e, UnicodeDecodeError):
        return f"not valid UTF-8 (byte {e.start + 1} of the line)"
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON ({e.msg}, column {e.colno})"
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e)[:200]


def read_jsonl(path: str | Path, convert: Callable[[Any], Any] | None = None) -> list[Any]:
    """Every record of a JSONL file, each through `convert`; `BadLine` names the file and line of the first bad one."""
    path = Path(path)
    records = []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            records.append(read_record(raw, convert))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise BadLine(f"{path}, line {n}: {fault_of(e)}") from None
    return records
