"""Problems as data: one record per problem, whatever the task, readable as JSON lines."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fclib.runs import check_fields, jsonl_line, read_jsonl


@dataclass(frozen=True)
class Problem:
    """A problem: `id`, `task`, `question`, gold `answer`, and task-specific `meta`."""

    id: str
    task: str
    question: str
    answer: Any
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: Any) -> Problem:
        """A Problem from its record; ValueError naming the field when a field is missing or of the wrong type."""
        check_fields(record, {"id": str, "task": str, "question": str}, "a problem")
        if "answer" not in record:
            raise ValueError("field 'answer' is missing")
        if not isinstance(record.get("meta", {}), dict):
            raise ValueError("field 'meta' must be an object")
        return cls(record["id"], record["task"], record["question"], record["answer"], dict(record.get("meta", {})))


def write_problems(path: str | Path, problems: Iterable[Problem]) -> Path:
    """Write problems as JSON lines (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for p in problems:
            fh.write(jsonl_line(p.to_dict()))
    tmp.replace(path)
    return path


def read_problems(path: str | Path) -> list[Problem]:
    """Read problems written by `write_problems`; a bad line (UTF-8, JSON, fields) raises naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no problem file at {path}")
    return read_jsonl(path, Problem.from_dict)
