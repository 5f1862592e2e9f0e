"""The speed-ups of fclib.fast: each switched by a parameter, and loud when a pinned library changes under it."""

from __future__ import annotations

import pytest

from fclib.fast import completion_scoring, grouped_attention, prefix_sharing


def test_completion_scoring_checks_that_trl_still_reads_what_it_patches(monkeypatch):
    import trl.trainer.utils as trl_utils

    completion_scoring.check()  # the pinned TRL: fine
    with completion_scoring.completion_only_scoring():
        assert trl_utils._use_triton("cpu") is True
    assert trl_utils._use_triton.__module__ == "trl.kernels.chunked_logprob"  # put back

    monkeypatch.delattr(trl_utils, "_use_triton")
    with pytest.raises(
        RuntimeError, match=r"patches trl.trainer.utils._use_triton, which this TRL no longer has or reads"
    ):
        with completion_scoring.completion_only_scoring():
            pass


def test_completion_scoring_refuses_when_no_trl_function_reads_the_name(monkeypatch):
    import trl.trainer.utils as trl_utils

    names = completion_scoring.readers()
    assert names, "the pinned TRL reads _use_triton somewhere"
    for name in names:  # as if TRL had renamed the name its functions read
        monkeypatch.setattr(trl_utils, name, lambda *a, **k: None)
    assert completion_scoring.readers() == []
    with pytest.raises(RuntimeError, match="no longer has or reads"):
        completion_scoring.check()


def test_prefix_sharing_checks_the_cache_it_builds_on(monkeypatch):
    from transformers import LlamaConfig
    from transformers.cache_utils import DynamicLayer

    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2, vocab_size=32
    )
    prefix_sharing.check(config)  # the pinned transformers: fine
    monkeypatch.delattr(DynamicLayer, "lazy_initialization")
    with pytest.raises(RuntimeError, match="DynamicCache layers, which changed"):
        prefix_sharing.check(config)


def test_grouped_attention_checks_that_transformers_still_reads_its_variable(monkeypatch):
    import os

    from transformers.integrations import sdpa_attention

    grouped_attention.check()  # the pinned transformers: fine
    monkeypatch.delenv(grouped_attention.VARIABLE, raising=False)
    with grouped_attention.grouped_kv_attention():
        assert os.environ[grouped_attention.VARIABLE] == "1"
    assert grouped_attention.VARIABLE not in os.environ  # put back as it was

    monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa", lambda attention_mask, key, value: False)
    with pytest.raises(RuntimeError, match="TRANSFORMERS_SDPA_FORCE_GQA, which this transformers no longer reads"):
        with grouped_attention.grouped_kv_attention():
            pass


def test_layer_recomputation_refuses_a_cache_that_changes_in_place(monkeypatch):
    from transformers import AutoConfig
    from transformers.cache_utils import DynamicLayer

    from fclib.fast import recompute
    from fclib.models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model("tiny"))
    recompute.check(config)  # the pinned transformers: fine

    def in_place(self, key_states, value_states, *args, **kwargs):  # what a replay could not undo
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys.resize_(*key_states.shape[:-2], self.keys.size(-2) + key_states.size(-2), key_states.size(-1))
        return self.keys, self.values

    monkeypatch.setattr(DynamicLayer, "update", in_place)
    with pytest.raises(RuntimeError, match="set recompute_layers=false"):
        recompute.check(config)


def test_every_speed_up_is_a_parameter_on_in_every_profile():
    from fclib import profiles
    from fclib.teacher import TeacherSettings
    from fclib.train import TrainSettings

    training = ("share_prompt_prefix", "completion_only_scoring", "grouped_kv_attention")
    for name in ("kv_cache", *training):
        for profile in ("smoke", "workshop", "cpu"):
            assert profiles.load_profile(profile)[name] is True
    for name in training:  # read by training, on by default
        assert TrainSettings.run_parameters()[name] == name and getattr(TrainSettings(), name) is True
        assert getattr(TrainSettings.from_params({name: False}), name) is False
    assert TeacherSettings.run_parameters()["kv_cache"] == "kv_cache" and TeacherSettings().kv_cache is True
