"""Problems as data: one record per problem, whatever the task, readable as JSON lines."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from fclib.runs import jsonl_line

REQUIRED = ("id", "task", "question", "answer")


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
    def from_dict(cls, record: dict[str, Any]) -> "Problem":
        missing = [k for k in REQUIRED if k not in record]
        if missing:
            raise ValueError(f"problem record lacks {', '.join(missing)}")
        if not isinstance(record.get("meta", {}), dict):
            raise ValueError("problem meta must be an object")
        return cls(str(record["id"]), str(record["task"]), str(record["question"]), record["answer"], dict(record.get("meta", {})))


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
    """Read problems written by `write_problems`; a bad line raises naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no problem file at {path}")
    out = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(Problem.from_dict(json.loads(line)))
            except (ValueError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}, line {n}: {e}") from None
    return out
