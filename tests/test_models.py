"""Model sources: the embedded SmolLM2 (offline), a tiny random model, folders and hub ids."""

import pytest

from fclib import models


def test_embedded_model_is_converted_once_and_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = models.embedded_model_dir()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert models.embedded_model_dir() == path  # cached
    assert models.resolve_model("embedded") == str(path)
    tok = models.load_tokenizer("embedded")
    assert tok.padding_side == "left" and tok.pad_token is not None and tok.chat_template


def test_tiny_model_shares_the_embedded_tokenizer(tiny):
    model, tokenizer = tiny
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def test_local_folder_and_hub_id(tmp_path, tiny):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, _ = models.load_model(tmp_path / "m")
    assert loaded.config.hidden_size == 64
    assert models.resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"


def test_clear_errors_for_missing_models(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.resolve_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.resolve_model(tmp_path / "empty")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1"):
        models.load_model("someone/not-downloaded-model")


def test_hub_ids_are_told_from_local_models_and_data(tmp_path):
    from fclib.models import hub_id
    from fclib.tasks import gsm8k

    assert hub_id("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-1.5B-Instruct"
    for local in ("embedded", "tiny", str(tmp_path), "/no/such/folder", "./model", "a/b/c"):
        assert hub_id(local) is None, local
    assert gsm8k.hub_id("openai/gsm8k") == "openai/gsm8k"
    for local in ("", None, str(tmp_path), "/no/such/folder", "gsm8k"):
        assert gsm8k.hub_id(local) is None, local
