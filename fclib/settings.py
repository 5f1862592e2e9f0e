"""Typed settings: one definition per stage, built from a run's parameters.

Each stage declares what it reads as a dataclass deriving from `Settings`:

    ProblemSettings (fclib.tasks)   notebook 01     PairSettings (fclib.pairs)    notebook 03
    AgentConfig (fclib.agent)       notebooks 02 05 TrainSettings (fclib.train)   notebook 04
    TeacherSettings (fclib.teacher) notebooks 02 05 EvalSettings (fclib.evaluate) notebook 05

A field is the run parameter of the same name (profiles/*.yaml, a notebook's parameters cell)
unless `PARAMETER_NAMES` names another (TrainSettings.max_steps is `train_max_steps`); its
default is the `cpu` profile's value; `faults()` says what is wrong with the values. Notebooks
build their settings from `globals()`, the CLI from params.yaml, and `profiles.validate` from a
profile before anything runs: each value is checked by the stage that uses it, and nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

S = TypeVar("S", bound="Settings")


class SettingsError(ValueError):
    """Bad values for a stage's settings; `faults` lists each one."""

    def __init__(self, owner: str, faults: list[str]):
        super().__init__(f"{owner}: " + "; ".join(faults))
        self.faults = faults


@dataclass
class Settings:
    PARAMETER_NAMES: ClassVar[dict[str, str]] = {}  # field -> run parameter, where the names differ

    def __post_init__(self) -> None:
        faults = self.number_faults() or self.faults()  # the checks of `faults` cannot tell NaN from a number
        if faults:
            raise SettingsError(type(self).__name__, faults)

    def number_faults(self) -> list[str]:
        """Every number a number, and finite: NaN and infinity (YAML's .nan, .inf) pass any comparison unnoticed."""
        wrong = []
        for f in fields(self):
            value = getattr(self, f.name)
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                wrong.append(f"{self.parameter(f.name)} must be a finite number, not {value!r}")
        return wrong

    def faults(self) -> list[str]:
        """What is wrong with these values (empty when nothing is)."""
        return []

    @classmethod
    def parameter(cls, field_name: str) -> str:
        """The run parameter a field reads."""
        return cls.PARAMETER_NAMES.get(field_name, field_name)

    @classmethod
    def run_parameters(cls) -> dict[str, str]:
        """{run parameter: field} of every field."""
        return {cls.parameter(f.name): f.name for f in fields(cls) if f.init}

    @classmethod
    def from_params(cls: type[S], params: Mapping[str, Any], **given: Any) -> S:
        """The settings of a run's parameters (a profile, params.yaml, a notebook's `globals()`).

        Fields whose parameter is absent keep their default; `given` sets fields directly.
        """
        values = {name: params[key] for key, name in cls.run_parameters().items() if key in params}
        return cls(**{**values, **given})
