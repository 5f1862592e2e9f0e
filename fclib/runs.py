"""Where a run writes (`outputs/<run_name>/`, found from the project, never from the working directory),
how it writes and reads a record, and how it shows progress."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import yaml

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there
    fcntl = None
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


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`key: old -> new` for each value that differs between two mappings, nested keys joined by dots."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


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
        raise UnreadableFile(f"{path} is unreadable ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
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


# One run folder, one writer. A pipeline or sweep holds its folder exclusively for as long as it runs; a notebook
# kernel (JupyterLab) holds its run's folder shared for as long as it lives. A second holder is refused at once,
# in one line naming the first. The kernels a pipeline starts find the folder held by it ($FCLIB_HELD_BY) and
# take nothing. Locks are flock(2) locks on `<folder>/.lock`: the system drops them when their process ends,
# however it ends, so a killed run never leaves a stale lock behind.
LOCK_FILE = ".lock"
HELD_BY_ENV = "FCLIB_HELD_BY"  # "<pid>:<folder>" of the pipeline that holds a run, for the kernels it starts
_held: dict[Path, list[Any]] = {}  # folder -> [file descriptor, times taken, shared] of the locks held here
_notebook_hold: list[Path] = []  # the run a notebook kernel holds (one at a time)


class RunInUse(RuntimeError):
    """Another process holds the run folder; the message says which and what to do."""


def _holder(folder: Path) -> str:
    try:
        info = json.loads((folder / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if info.get("pid") and psutil.pid_exists(info["pid"]):
        return f"process {info['pid']} ({info.get('what', '?')}, since {info.get('since', '?')})"
    return "a notebook kernel (JupyterLab or Jupyter: shut that kernel down to free it)"


def _take(folder: Path, shared: bool, what: str) -> None:
    folder = folder.resolve()
    if folder in _held:  # taken again by this process (a sweep holds a run that it then runs): re-entrant
        _held[folder][1] += 1
        return
    if fcntl is None:  # not a POSIX system: no lock, as before
        _held[folder] = [None, 1, shared]
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunInUse(
            f"{folder} is in use by {_holder(folder)}: wait for it to end, or choose another run name"
        ) from None
    if not shared:
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        info = json.dumps({"pid": os.getpid(), "what": what, "since": since})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
    _held[folder] = [fd, 1, shared]


def _drop(folder: Path) -> None:
    folder = folder.resolve()
    entry = _held.get(folder)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[folder]
        if entry[0] is not None:
            if not entry[2]:
                os.ftruncate(entry[0], 0)  # no longer this process's: a later refusal must not name it
            os.close(entry[0])  # closing the descriptor releases the lock


@contextmanager
def lock_run(folder: str | Path, what: str = "") -> Iterator[None]:
    """Hold a run (or sweep) folder for the block, alone; `RunInUse` if any other process holds it.

    The kernels started inside the block see the folder as held by their parent (`held_by_parent`).
    """
    folder = Path(folder)
    _take(folder, shared=False, what=what or " ".join(sys.argv)[:200])
    before = os.environ.get(HELD_BY_ENV)
    os.environ[HELD_BY_ENV] = f"{os.getpid()}:{folder.resolve()}"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(HELD_BY_ENV, None)
        else:
            os.environ[HELD_BY_ENV] = before
        _drop(folder)


def held_by_parent(folder: str | Path) -> bool:
    """Whether `folder` is held by a process this one descends from (the pipeline that started this kernel)."""
    pid, _, held = os.environ.get(HELD_BY_ENV, "").partition(":")
    if not pid.isdigit() or Path(held) != Path(folder).resolve():
        return False
    try:
        return int(pid) in {p.pid for p in psutil.Process().parents()} or int(pid) == os.getpid()
    except psutil.Error:
        return False


def hold(folder: str | Path) -> None:
    """A notebook kernel's hold on its run (shared with other kernels, refused while a pipeline runs it), kept
    until the kernel ends or holds another run. Nothing is taken where the kernel's own pipeline holds it."""
    folder = Path(folder).resolve()
    if held_by_parent(folder) or folder in _notebook_hold:
        return
    _take(folder, shared=True, what="notebook")
    for old in _notebook_hold:
        _drop(old)
    _notebook_hold[:] = [folder]
