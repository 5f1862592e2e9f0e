"""One value per setting: the cpu profile, the notebooks' parameter defaults and the library's defaults agree.

Where a library function or settings class has a parameter that is also a run parameter (by
name, or through `ALIASES`), its default must be the cpu profile's value, so code called
without arguments behaves as the study's default does.
"""

from __future__ import annotations

import inspect

import pytest

import fclib.agent
import fclib.backends
import fclib.backends.endpoint
import fclib.backends.local
import fclib.chains
import fclib.evaluate
import fclib.pairs
import fclib.tasks
import fclib.tasks.fol
import fclib.tasks.gsm8k
import fclib.teacher
import fclib.train
from fclib import pipeline

MODULES = [
    fclib.agent,
    fclib.backends,
    fclib.backends.endpoint,
    fclib.backends.local,
    fclib.chains,
    fclib.evaluate,
    fclib.pairs,
    fclib.tasks,
    fclib.tasks.fol,
    fclib.tasks.gsm8k,
    fclib.teacher,
    fclib.train,
]
ALIASES = {  # (callable, its parameter) -> the run parameter it is
    ("TrainSettings", "max_steps"): "train_max_steps",
    ("TrainSettings", "epochs"): "train_epochs",
    ("TrainSettings", "batch_size"): "train_batch_size",
    ("AgentConfig", "temperature"): "eval_temperature",  # the agent samples greedily unless told; the teacher is told
    ("LocalBackend", "batch_size"): "concurrency",
}
NOT_THE_RUN_PARAMETER = {  # same name, another meaning
    ("GenerationSettings", "temperature"): "one request's sampling; the agent sets it from its config",
    ("save_pairs", "run_name"): "a label for the dataset card; empty: the folder's parent",
    ("build_pairs", "max_length"): "None: no length check without the student's tokenizer, which the caller gives",
    ("build_problems", "gsm8k_source"): "None and '' both mean the copy shipped in fclib/data/gsm8k",
}


def _defaults() -> list[tuple[str, str, object]]:
    """(callable, parameter, default) of every public function and class of the stages and the core."""
    found = []
    for module in MODULES:
        for name, obj in inspect.getmembers(module, lambda o: inspect.isfunction(o) or inspect.isclass(o)):
            if obj.__module__ != module.__name__ or name.startswith("_"):
                continue
            for callable_ in [obj] + ([obj.load] if hasattr(obj, "load") else []):
                try:
                    signature = inspect.signature(callable_)
                except (TypeError, ValueError):
                    continue
                for parameter in signature.parameters.values():
                    default = parameter.default
                    if default is inspect.Parameter.empty:
                        continue
                    if inspect.isclass(obj) and getattr(obj, "__dataclass_fields__", None):
                        field = obj.__dataclass_fields__.get(parameter.name)
                        if field is not None and field.default_factory is not field.default:  # a factory: call it
                            default = field.default_factory() if callable(field.default_factory) else default
                    found.append((name, parameter.name, default))
    return found


def test_library_defaults_are_the_cpu_profile():
    cpu = pipeline.load_profile("cpu")
    wrong, compared = [], set()
    for owner, name, default in _defaults():
        run_parameter = ALIASES.get((owner, name), name)
        if run_parameter not in cpu or (owner, name) in NOT_THE_RUN_PARAMETER:
            continue
        compared.add(run_parameter)
        if default != cpu[run_parameter]:
            wrong.append(f"{owner}({name}={default!r}) but the cpu profile has {run_parameter}: {cpu[run_parameter]!r}")
    assert not wrong, "\n".join(wrong)
    assert {"learning_rate", "max_length", "max_steps", "max_tokens_per_turn", "train_max_steps", "k"} <= compared
    assert len(compared) >= 25, sorted(compared)


def test_notebook_defaults_are_the_cpu_profile():
    cpu = pipeline.load_profile("cpu")
    declared = pipeline.notebook_parameters()
    wrong = {k: (v, cpu[k]) for k, v in declared.items() if v != cpu[k]}
    assert not wrong, f"notebook default vs cpu profile: {wrong}"


@pytest.mark.parametrize("owner, name", sorted(ALIASES))
def test_every_alias_names_a_real_parameter(owner, name):
    assert any(o == owner and n == name for o, n, _ in _defaults()), f"{owner} has no parameter {name}"
