"""One place per setting: each stage's settings class reads the run parameters, and every default agrees.

Every run parameter is a field of a stage's settings (`fclib.settings`), which checks it. Where
a library function or settings class has a parameter that is also a run parameter (by name,
through a settings class's `PARAMETER_NAMES`, or through `ALIASES`), its default must be the cpu
profile's value, so code called without arguments behaves as the study's default does.
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
from fclib import profiles
from fclib.agent import AgentConfig
from fclib.settings import Settings, SettingsError

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
ALIASES = {  # (callable, its parameter) -> the run parameter it is; settings classes say it in PARAMETER_NAMES
    ("LocalBackend", "batch_size"): "concurrency",
}
SETTINGS = (*profiles.STAGE_SETTINGS, AgentConfig)
NOT_THE_RUN_PARAMETER = {  # same name, another meaning
    ("GenerationSettings", "temperature"): "one request's sampling; the agent sets it from its config",
    ("save_pairs", "run_name"): "a label for the dataset card; empty: the folder's parent",
    ("build_pairs", "max_length"): "None: no length check without the student's tokenizer, which the caller gives",
    ("build_problems", "gsm8k_source"): "None and '' both mean the copy shipped in fclib/data/gsm8k",
    ("build_problems", "test_nmax"): "() and [] both mean: held-out worlds of the training sizes",
}


def _defaults() -> list[tuple[str, str, object]]:
    """(callable, run parameter, default) of every public function and class of the stages and the core."""
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
                    is_settings = inspect.isclass(obj) and issubclass(obj, Settings) and callable_ is obj
                    key = obj.parameter(parameter.name) if is_settings else parameter.name
                    found.append((name, ALIASES.get((name, key), key), default))
    return found


def test_library_defaults_are_the_cpu_profile():
    cpu = profiles.load_profile("cpu")
    wrong, compared = [], set()
    for owner, run_parameter, default in _defaults():
        if run_parameter not in cpu or (owner, run_parameter) in NOT_THE_RUN_PARAMETER:
            continue
        compared.add(run_parameter)
        if default != cpu[run_parameter]:
            wrong.append(
                f"{owner}: default {default!r} for {run_parameter} but the cpu profile has {cpu[run_parameter]!r}"
            )
    assert not wrong, "\n".join(wrong)
    assert {"learning_rate", "max_length", "max_steps", "max_tokens_per_turn", "train_max_steps", "k"} <= compared
    assert len(compared) >= 25, sorted(compared)


def test_notebook_defaults_are_the_cpu_profile():
    cpu = profiles.load_profile("cpu")
    declared = profiles.notebook_parameters()
    wrong = {k: (v, cpu[k]) for k, v in declared.items() if v != cpu[k]}
    assert not wrong, f"notebook default vs cpu profile: {wrong}"


@pytest.mark.parametrize("owner, name", sorted(ALIASES))
def test_every_alias_names_a_real_parameter(owner, name):
    assert any(o == owner and n == ALIASES[owner, name] for o, n, _ in _defaults()), f"{owner} has no parameter {name}"


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda c: c.__name__)
def test_the_cpu_profile_builds_each_stage_settings_at_its_defaults(settings):
    cpu = profiles.load_profile("cpu")
    built = settings.from_params(cpu, **({"temperature": 0.0} if settings is AgentConfig else {}))
    assert built == settings(), f"{settings.__name__} of the cpu profile differs from its defaults"
    read = set(settings.run_parameters()) & set(cpu)
    assert read, f"{settings.__name__} reads no run parameter"
    for key in read:  # and each value it read is the profile's
        assert getattr(built, settings.run_parameters()[key]) == cpu[key], key


def test_every_run_parameter_is_a_field_of_a_stage_settings():
    cpu = profiles.load_profile("cpu")
    read = {key for settings in SETTINGS for key in settings.run_parameters()}
    own = {"run_name", *profiles.PIPELINE_PARAMETERS}  # the run's name and recipe: the pipeline's own
    assert set(cpu) - read == own, "run parameters no stage's settings declare"
    for notebook_parameter in profiles.notebook_parameters():
        assert notebook_parameter in read | {"run_name"}, notebook_parameter


def test_a_bad_value_is_refused_by_the_stage_that_reads_it():
    from fclib.evaluate import EvalSettings
    from fclib.pairs import PairSettings
    from fclib.tasks import ProblemSettings
    from fclib.teacher import TeacherSettings
    from fclib.train import TrainSettings

    cases = [
        (ProblemSettings, {"nmax": 1}, "nmax must be integers"),
        (ProblemSettings, {"fol_train": 0, "gsm8k_train": 0}, "no training problems"),
        (TeacherSettings, {"k": 1}, "k >= 2"),
        (TeacherSettings, {"step_samples": 2, "reference_chains": False}, "reference_chains=true"),
        (TeacherSettings, {"teacher_url": "ftp://x"}, "http"),
        (PairSettings, {"pair_strategy": "best"}, "pair_strategy must be one of"),
        (PairSettings, {"validation_share": 1.0}, "validation_share"),
        (TrainSettings, {"beta": 0}, "beta and learning_rate must be > 0"),
        (TrainSettings, {"loss_weights": [1.0]}, "one weight per loss_type"),
        (EvalSettings, {"eval_models": ["dpo", "gpt"]}, "eval_models"),
        (EvalSettings, {"eval_max_tokens_per_turn": -1}, "eval_max_tokens_per_turn"),
        (AgentConfig, {"max_steps": 0}, "max_steps must be at least 1"),
    ]
    for settings, values, message in cases:
        with pytest.raises(SettingsError, match=message) as refused:
            settings.from_params(values)
        assert refused.value.faults and settings.__name__ in str(refused.value)


def test_validate_reports_every_fault_of_every_stage_once_and_never_shows_a_key():
    params = {
        **profiles.load_profile("cpu"),
        "nmax": 1,
        "k": 1,
        "pair_strategy": "best",
        "beta": 0,
        "eval_models": [],
        "max_steps": 0,
        "teacher_api_key_env": "sk-live-abcdef123",
    }
    wrong = profiles.validate(params)
    for message in ("nmax", "k=1", "pair_strategy", "beta", "eval_models", "max_steps", "NAME of an environment"):
        assert sum(message in fault for fault in wrong) == 1, (message, wrong)
    assert not any("sk-live" in fault for fault in wrong)
