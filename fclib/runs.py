"""Where a run writes (`outputs/<run_name>/`, found from the project, never from the working directory),
how it writes and reads a record, and how it shows progress."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as text_tqdm

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TEXT_PROGRESS_ENV = "FCLIB_TEXT_PROGRESS"  # set by the pipeline: notebooks run headless show text bars
log = logging.getLogger(__name__)


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


def jsonl_lines(data: bytes) -> list[bytes]:
    """The lines of JSONL bytes, split as `jsonl_line` writes them: on `\n` alone.

    Never `str.splitlines()`, which also splits on U+2028, U+2029, U+0085 and other characters a model's
    reply may hold: a record holding one would come back as two damaged lines.
    """
    return data.split(b"\n")


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
    for n, raw in enumerate(jsonl_lines(path.read_bytes()), 1):
        if not raw.strip():
            continue
        try:
            records.append(read_record(raw, convert))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise BadLine(f"{path}, line {n}: {fault_of(e)}") from None
    return records


def write_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` whole or not at all: a reader, or a kill at any moment, finds the old file or the new.

    The text goes to a temporary file beside `path` (its name unique to this process), flushed to disk, then
    renamed over `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, value: Any) -> Path:
    """`value` as indented JSON, written atomically (`write_atomic`)."""
    return write_atomic(path, json.dumps(value, indent=2, default=str) + "\n")


def write_yaml(path: str | Path, value: Any) -> Path:
    """`value` as YAML in its own key order, written atomically (`write_atomic`)."""
    return write_atomic(path, yaml.safe_dump(value, sort_keys=False, allow_unicode=True))


class UnreadableFile(ValueError):
    """A run's side file (params.yaml, sweep.json, ...) that cannot be read; the message names it and says why."""


def read_mapping(path: str | Path) -> dict[str, Any] | None:
    """The mapping a JSON or YAML side file holds (`.json`: JSON, else YAML); None when the file is absent.

    An empty, cut or malformed file raises `UnreadableFile` naming it (a kill during a write that was
    not atomic, or a hand edit).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        text = path.read_bytes().decode("utf-8")
        value = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, ValueError, yaml.YAMLError, RecursionError) as e:
        raise UnreadableFile(f"{path} is unreadable ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(value, dict):
        raise UnreadableFile(f"{path} is unreadable (it holds {type(value).__name__}, not a mapping)")
    return value


def read_record_file(path: str | Path) -> dict[str, Any]:
    """A side file that only records (timings.json, memory.json, sweep.json): its mapping, {} when absent.

    An unreadable one must not stop every later start: it is named in a warning, kept as
    `<name>.unreadable` for inspection, and {} comes back, so it is written anew.
    """
    path = Path(path)
    try:
        return read_mapping(path) or {}
    except UnreadableFile as e:
        aside = path.with_name(path.name + ".unreadable")
        os.replace(path, aside)
        log.warning("%s; set aside as %s and started anew", e, aside.name)
        return {}
