"""QLoRA / LoRA + DPO training of the student with TRL's DPOTrainer and a PEFT adapter.

    result = train("outputs/cpu/pairs", "outputs/cpu", TrainSettings(student="embedded"))

On CUDA the student loads in 4-bit nf4 (bitsandbytes) with bf16 compute and trains a LoRA
adapter: QLoRA, as in the paper. On CPU it trains plain LoRA in fp32 by default; with
`precision='bf16'` the frozen base is held in bfloat16 and the adapter in fp32 (a switch, not exact:
less memory, and faster matrix products where the CPU computes bfloat16 natively). The
reference model is the base with the adapter disabled, one copy in memory; with
`precompute_ref=True` the reference log-probabilities are computed once before training.
Checkpoints go to `model/checkpoints/`, and an interrupted training resumes from the last one.
The adapter, the tokenizer and the exact settings are saved to `model/adapter/`, the log to
`train/log_history.json`.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml
from safetensors import safe_open

from fclib import checkpoints, runs
from fclib.fast.completion_scoring import completion_only_scoring
from fclib.fast.grouped_attention import grouped_kv_attention
from fclib.fast.prefix_sharing import causal_lm, shared_prompt_prefix
from fclib.fast.recompute import recompute_layers
from fclib.models import load_model, load_tokenizer, model_fault, resolve_model
from fclib.pairs import load_pairs, tools_of
from fclib.runs import TEXT_PROGRESS_ENV
from fclib.settings import Settings

log = logging.getLogger(__name__)

QUANTIZATION = ("auto", "4bit", "none")
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainSettings(Settings):
    """Notebook 04: what people tune; the defaults are the `cpu` profile's. `quantization='auto'`: 4-bit on CUDA."""

    PARAMETER_NAMES: ClassVar[dict[str, str]] = {
        "epochs": "train_epochs",
        "max_steps": "train_max_steps",
        "batch_size": "train_batch_size",
        "precision": "train_precision",
    }

    student: str = "embedded"
    quantization: str = "auto"  # auto | 4bit | none
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    beta: float = 0.1
    learning_rate: float = 5e-4
    epochs: float = 1.0
    max_steps: int = 20  # > 0 overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1280
    truncation_mode: str = "keep_start"
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid", "sft"])
    loss_weights: list[float] | None = field(default_factory=lambda: [1.0, 1.0])
    precompute_ref: bool = False
    precision: str = "auto"  # auto (4-bit: bf16 compute; else fp32) | fp32 | bf16 (the frozen base in bf16: inexact)
    eval_steps: int = 0  # 0: no validation during training
    save_steps: int = 10
    logging_steps: int = 1
    seed: int = 0
    share_prompt_prefix: bool = True  # fclib.fast.prefix_sharing: shared prompt tokens run once (exact)
    completion_only_scoring: bool = True  # fclib.fast.completion_scoring: TRL scores only completions on CPU too
    grouped_kv_attention: bool = True  # fclib.fast.grouped_attention: key/value heads not copied per query head
    recompute_layers: bool = False  # fclib.fast.recompute: layers rerun in backward, not kept (less memory)
    merge_adapter: bool = False  # also save a standalone merged model to model/merged/ (notebook 04)

    def faults(self) -> list[str]:
        wrong = []
        if self.quantization not in QUANTIZATION:
            wrong.append(f"quantization must be one of {QUANTIZATION}, not {self.quantization!r}")
        if self.precision not in TRAIN_PRECISIONS:
            wrong.append(f"train_precision must be one of {TRAIN_PRECISIONS}, not {self.precision!r}")
        if self.lora_r < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.max_length < 16:
            wrong.append("lora_r, batch_size and grad_accum must be >= 1, max_length >= 16")
        if self.beta <= 0 or self.learning_rate <= 0:
            wrong.append("beta and learning_rate must be > 0")
        if not 0 <= self.lora_dropout < 1:
            wrong.append(f"lora_dropout is a probability in [0, 1), not {self.lora_dropout!r}")
        if self.epochs <= 0 and self.max_steps <= 0:
            wrong.append("train_epochs must be > 0 unless train_max_steps > 0")
        fault = model_fault(self.student)
        if fault:
            wrong.append(f"student: {fault}")
        if self.eval_steps < 0 or self.save_steps < 1:
            wrong.append("eval_steps must be >= 0 (0: no validation during training) and save_steps >= 1")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            wrong.append("loss_weights needs one weight per loss_type")
        return wrong


def use_4bit(settings: TrainSettings) -> bool:
    """Whether this training loads the student in 4-bit; refuses 4-bit without CUDA, saying what to do."""
    import torch

    if settings.quantization == "4bit":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "quantization='4bit' (QLoRA) needs a CUDA GPU and none is visible. On CPU use quantization='none' "
                "(or 'auto'), which trains plain LoRA in fp32."
            )
        return True
    return settings.quantization == "auto" and torch.cuda.is_available()


def load_base(student: str, four_bit: bool, bf16: bool = False) -> tuple[Any, Any]:
    """The student (4-bit nf4 with bf16 compute, bf16, or fp32) and its tokenizer."""
    import torch

    try:
        if not four_bit:
            return load_model(student, dtype="bfloat16" if bf16 else "float32")
        from accelerate import PartialState
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        source = resolve_model(student)
        device = PartialState().local_process_index  # under accelerate launch: this process's own GPU
        model = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=quant, dtype=torch.bfloat16, device_map={"": device}
        )
        return model, load_tokenizer(source)
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load the student {student!r}: {e}. Offline, give 'embedded', 'tiny' or a local model folder."
        ) from None


def check_pairs(data: Any, tokenizer: Any, max_length: int) -> None:
    """Clear errors for an empty or mis-shaped dataset, and for prompts longer than max_length."""
    if "train" not in data or data["train"].num_rows == 0:
        raise ValueError("the pair dataset has no training pairs: see pairs/stats.json ('dropped') and notebook 03")
    missing = {"prompt", "chosen", "rejected"} - set(data["train"].column_names)
    if missing:
        raise ValueError(
            f"the pair dataset lacks the column(s) {sorted(missing)}: expected TRL's prompt/chosen/rejected"
        )
    first = data["train"][0]
    if not (isinstance(first["prompt"], list) and first["prompt"] and isinstance(first["prompt"][0], dict)):
        raise ValueError("prompt must be a list of chat messages (conversational format), as notebook 03 writes it")
    longest = 0
    for split in data.values():
        for row in split.select_columns(["prompt"]):
            text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            longest = max(longest, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    if longest >= max_length:
        raise ValueError(
            f"max_length={max_length} is shorter than the longest prompt ({longest} tokens): every completion token of "
            f"such a pair would be cut. Raise max_length above {longest} (or drop long pairs in notebook 03)."
        )


def dpo_config(settings: TrainSettings, output_dir: Path, four_bit: bool, has_eval: bool) -> Any:
    """The DPOConfig of a training; bf16 autocast only for a 4-bit student (QLoRA)."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(output_dir),
        beta=settings.beta,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        max_length=settings.max_length,
        truncation_mode=settings.truncation_mode,
        loss_type=list(settings.loss_type),
        loss_weights=list(settings.loss_weights) if settings.loss_weights else None,
        precompute_ref_log_probs=settings.precompute_ref,
        bf16=four_bit,
        use_cpu=not four_bit and not _cuda(),
        eval_strategy="steps" if has_eval and settings.eval_steps > 0 else "no",
        eval_steps=settings.eval_steps or None,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        logging_steps=settings.logging_steps,
        seed=settings.seed,
        data_seed=settings.seed,
        report_to=[],
        activation_checkpointing=four_bit,
        disable_tqdm=False,
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def lora_config(settings: TrainSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )


def make_trainer(
    pairs_dir: str | Path, run_folder: str | Path, settings: TrainSettings, callbacks: list | None = None
) -> Any:
    """A DPOTrainer on the saved pairs, the student, a fresh LoRA adapter (not yet trained)."""
    from transformers import set_seed
    from trl import DPOTrainer

    set_seed(settings.seed)
    four_bit = use_4bit(settings)
    data = load_pairs(pairs_dir)
    model, tokenizer = load_base(settings.student, four_bit, bf16=settings.precision == "bf16")
    check_pairs(data, tokenizer, settings.max_length)
    if four_bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    has_eval = "validation" in data and data["validation"].num_rows > 0
    args = dpo_config(settings, Path(run_folder) / "model" / "checkpoints", four_bit, has_eval)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"] if has_eval else None,
        processing_class=tokenizer,
        peft_config=lora_config(settings),
        callbacks=callbacks,
    )
    if os.environ.get(TEXT_PROGRESS_ENV):  # headless: a text bar and a line per logged step reach the terminal
        from transformers.trainer_callback import ProgressCallback
        from transformers.utils.notebook import NotebookProgressCallback

        trainer.remove_callback(NotebookProgressCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(ProgressCallback)
    return trainer


WEIGHTLESS = (
    "merge_adapter",
    "eval_steps",
    "save_steps",
    "logging_steps",
)  # settings that leave the weights as they are


def last_checkpoint(run_folder: str | Path) -> str | None:
    """The last checkpoint of a run's training, complete or not (what a rerun looks at first)."""
    from transformers.trainer_utils import get_last_checkpoint

    checkpoints = Path(run_folder) / "model" / "checkpoints"
    return get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None


def train(
    pairs_dir: str | Path,
    run_folder: str | Path,
    settings: TrainSettings,
    resume: bool = True,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Train, save the adapter and the log; safe to run again whatever stopped it (`fclib.checkpoints`).

    A finished training with the same settings and pairs is recognised and not repeated (`reused` in the
    result); otherwise training resumes from the last complete checkpoint of the same settings and pairs,
    and starts afresh when there is none (other checkpoints are set aside). Under `accelerate launch`
    every process trains on its shard of the pairs and only the main process writes the adapter and the
    log; `info["main_process"]` says which one this is.
    """
    run_folder = Path(run_folder)
    adapter, checkpoint_dir = run_folder / "model" / "adapter", run_folder / "model" / "checkpoints"
    mark = checkpoints.fingerprint(asdict(settings), pairs_dir, WEIGHTLESS)
    main = int(os.environ.get("RANK", "0")) == 0  # accelerate's main process (or the only one)
    done = checkpoints.finished(adapter, mark) if resume else None
    if done is not None:
        log.info("the training in %s is finished, with these settings and pairs: not repeated", adapter)
        done = {**done, "settings": asdict(settings)}  # settings that leave the weights as they are may differ
        if main:
            runs.write_json(adapter / "fclib_training.json", done)
        return {**done, "reused": True, "main_process": main}
    if not resume and main:
        checkpoints.set_aside_all(checkpoint_dir)
    checkpoint = checkpoints.resumable(checkpoint_dir, mark, writer=main)
    state = checkpoints.state(checkpoint) if checkpoint else None
    if state and state.get("max_steps") and state["global_step"] >= state["max_steps"]:
        log.info("%s holds the last step: it is the training's result", checkpoint)
        return _finish_from(checkpoint, state, pairs_dir, run_folder, settings, mark, main)
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    info = _train(pairs_dir, run_folder, settings, checkpoint, mark, callbacks)
    release_memory()  # the trainer is gone: its freed activations go back to the system
    return info


def _train(
    pairs_dir: str | Path,
    run_folder: Path,
    settings: TrainSettings,
    checkpoint: Path | None,
    mark: dict[str, Any],
    callbacks: list | None,
) -> dict[str, Any]:
    """Train from `checkpoint` (or afresh) and save the adapter and the log (main process only)."""
    with completion_only_scoring() if settings.completion_only_scoring else nullcontext():
        trainer = make_trainer(pairs_dir, run_folder, settings, callbacks)
        with (
            shared_prompt_prefix(trainer.model) if settings.share_prompt_prefix else nullcontext(),
            grouped_kv_attention() if settings.grouped_kv_attention else nullcontext(),
            recompute_layers(trainer.model) if settings.recompute_layers else nullcontext(),
        ):
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if not math.isfinite(result.training_loss):
        raise FloatingPointError(f"the training loss is {result.training_loss}: lower learning_rate or check the pairs")
    info = {
        "settings": asdict(settings),
        "fingerprint": mark,
        "quantized_4bit": use_4bit(settings),
        "resumed_from": str(checkpoint) if checkpoint else None,
        "global_step": result.global_step,
        "training_loss": result.training_loss,
        "trainable_parameters": trainable_parameters(trainer.model),
        "processes": trainer.args.world_size,
    }
    if not trainer.is_world_process_zero():  # one writer under accelerate launch
        return {**info, "main_process": False}

    def save_adapter(target: Path) -> None:
        trainer.model.save_pretrained(str(target))
        trainer.processing_class.save_pretrained(str(target))

    _save(run_folder, info, trainer.state.log_history, trainer.args.to_json_string(), save_adapter)
    return {**info, "main_process": True}


def release_memory() -> None:
    """Hand freed memory back to the system: training leaves gigabytes of freed activations in glibc's heap, which
    a notebook's kernel would otherwise keep resident for the cells after it (a no-op without glibc)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        pass


def _save(run_folder: Path, info: dict[str, Any], log_history: list, args_json: str, save_adapter: Any) -> None:
    """Write the log, the training arguments, the adapter and, last, its record (`fclib_training.json`, whose
    fingerprint says the adapter is whole); the old record goes first, so a kill in between leaves no adapter
    that a rerun would take for finished."""
    adapter = run_folder / "model" / "adapter"
    (adapter / "fclib_training.json").unlink(missing_ok=True)
    runs.write_atomic(run_folder / "train" / "log_history.json", json.dumps(log_history, indent=1))
    save_adapter(adapter)
    runs.write_atomic(adapter / "dpo_config.json", args_json)
    runs.write_json(adapter / "fclib_training.json", info)


def _finish_from(
    checkpoint: Path,
    state: dict[str, Any],
    pairs_dir: str | Path,
    run_folder: Path,
    settings: TrainSettings,
    mark: dict[str, Any],
    main: bool,
) -> dict[str, Any]:
    """The training's result from its checkpoint at the last step (a run killed after the last step, before the
    adapter was written): that checkpoint's adapter, tokenizer and log, without another step (resuming there,
    transformers' Trainer would take one more)."""
    losses = [e["loss"] for e in state.get("log_history", []) if "loss" in e]
    with safe_open(str(checkpoint / "adapter_model.safetensors"), "pt") as f:
        trainable = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    base, _ = load_base(settings.student, four_bit=False)
    info = {
        "settings": asdict(settings),
        "fingerprint": mark,
        "quantized_4bit": use_4bit(settings),
        "resumed_from": str(checkpoint),
        "global_step": state["global_step"],
        "training_loss": sum(losses) / len(losses) if losses else float("nan"),  # the mean step loss, as logged
        "trainable_parameters": {
            "trainable": trainable,
            "total": trainable + sum(p.numel() for p in base.parameters()),
        },
        "processes": 1,
    }
    if not main:
        return {**info, "main_process": False}
    validation = Path(pairs_dir) / "validation.jsonl"
    has_eval = validation.is_file() and validation.stat().st_size > 0
    args = dpo_config(settings, run_folder / "model" / "checkpoints", use_4bit(settings), has_eval)

    def copy_adapter(target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        for f in checkpoint.iterdir():
            if f.is_file() and f.name not in CHECKPOINT_ONLY:
                shutil.copy2(f, target / f.name)

    _save(run_folder, info, state.get("log_history", []), args.to_json_string(), copy_adapter)
    return {**info, "main_process": True}


CHECKPOINT_ONLY = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin")


def trainable_parameters(model: Any) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}


PRECISIONS = ("auto", "fp32", "bf16", "4bit")


def resolve_precision(precision: str = "auto", adapter_dir: str | Path | None = None) -> str:
    """The precision a student is evaluated in. 'auto': fp32 on a CPU; on CUDA, 4-bit where the adapter
    was trained on the 4-bit base (QLoRA: evaluated as trained, unmerged), else bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision != "auto":
        return precision
    if not _cuda():
        return "fp32"
    info = Path(adapter_dir) / "fclib_training.json" if adapter_dir else None
    return "4bit" if info and info.is_file() and json.loads(info.read_text()).get("quantized_4bit") else "bf16"


def load_for_eval(name: str, precision: str = "fp32") -> tuple[Any, Any]:
    """A model for evaluation in `precision` ('fp32', 'bf16': on the GPU if there is one; '4bit': nf4, CUDA only)."""
    if precision == "4bit":
        if not _cuda():
            raise RuntimeError("precision '4bit' needs a CUDA GPU; on a CPU evaluate in fp32 (or 'auto')")
        return load_base(name, four_bit=True)
    return load_model(name, dtype={"fp32": "float32", "bf16": "bfloat16"}[precision])


def load_student(
    adapter_dir: str | Path, base: str | None = None, merge: bool = False, precision: str = "fp32"
) -> tuple[Any, Any]:
    """Base + trained adapter for evaluation, the base in `precision` (`resolve_precision`); `merge=True` folds
    the adapter in (not into a 4-bit base: a QLoRA adapter is evaluated unmerged, as it was trained).

    The base is read from the adapter's training settings unless given.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no trained adapter at {adapter_dir}: run notebook 04 first")
    if base is None:
        base = json.loads((adapter_dir / "fclib_training.json").read_text())["settings"]["student"]
    precision = resolve_precision(precision, adapter_dir)
    if merge and precision == "4bit":
        raise ValueError("a 4-bit base is evaluated with its adapter unmerged: merge=False")
    model, _ = load_for_eval(base, precision)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    if merge:
        model = model.merge_and_unload()
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    tokenizer.padding_side = "left"
    return model, tokenizer


def adapter_id(adapter_dir: str | Path, base: str) -> str:
    """The model id of base + adapter, naming the adapter's weights by their hash: `embedded+adapter@1a2b3c4d5e6f`.

    Evaluation results carry it, so results of another training (other weights under the same
    folder) are told apart and redone rather than mixed.
    """

    digest = hashlib.sha256((Path(adapter_dir) / "adapter_model.safetensors").read_bytes()).hexdigest()
    return f"{base}+adapter@{digest[:12]}"


def _rows(tokenizer: Any, items: list[tuple[list[dict], list[dict], Any]]) -> list[tuple[list[int], int]]:
    """(token ids of prompt + completion, where the completion starts) of each item, through the chat template."""

    def ids(messages: list[dict], tools: Any, generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    rows = []
    for prompt, completion, tools in items:
        head, full = ids(prompt, tools, True), ids(prompt + completion, tools, False)
        if full[: len(head)] != head:
            raise ValueError("the rendered prompt is not a prefix of prompt + completion")
        rows.append((full, len(head)))
    return rows


def completion_lengths(tokenizer: Any, items: list[tuple[list[dict], list[dict], Any]]) -> list[int]:
    """How many tokens of each item `completion_logps` scores (the completion's, after its prompt)."""
    return [len(full) - start for full, start in _rows(tokenizer, items)]


def completion_logps(model: Any, tokenizer: Any, items: list[tuple[list[dict], list[dict], Any]]) -> list[float]:
    """Sum of the model's log-probabilities of each completion's tokens after its prompt (chat template).

    `items` are (prompt, completion, tools). They run as one right-padded batch whose shared
    prompt prefixes are computed once (`shared_prompt_prefix`), and the LM head projects only
    the completion positions.
    """
    import torch

    rows = _rows(tokenizer, items)
    if not rows:
        return []
    width = max(len(full) for full, _ in rows)
    x = torch.tensor([full + [0] * (width - len(full)) for full, _ in rows], device=model.device)
    mask = torch.tensor([[1] * len(full) + [0] * (width - len(full)) for full, _ in rows], device=model.device)
    causal = causal_lm(model)
    out = []
    with torch.inference_mode(), shared_prompt_prefix(model):
        hidden = causal.base_model(input_ids=x, attention_mask=mask).last_hidden_state
        for row, (full, start) in enumerate(rows):
            logits = causal.get_output_embeddings()(hidden[row, start - 1 : len(full) - 1]).float()
            out.append(float(torch.log_softmax(logits, -1).gather(1, x[row, start : len(full), None]).sum()))
    return out


def pair_items(pairs: Any) -> list[tuple[list[dict], list[dict], Any]]:
    """(prompt, completion, tools) of each pair's chosen, then its rejected completion: chosen at even places."""
    items = []
    for pair in pairs:
        tools = tools_of(pair)
        items += [(pair["prompt"], pair["chosen"], tools), (pair["prompt"], pair["rejected"], tools)]
    return items


def policy_margins(model: Any, tokenizer: Any, pairs: Any) -> list[float]:
    """log p(chosen) - log p(rejected) of each pair under `model` (DPO raises this margin)."""
    logps = completion_logps(model, tokenizer, pair_items(pairs))
    return [chosen - rejected for chosen, rejected in zip(logps[::2], logps[1::2])]


def trl_metrics(adapter_dir: str | Path, pairs: Any, settings: TrainSettings) -> dict[str, float]:
    """TRL's own loss and log-probabilities of `pairs` (a Dataset) as one batch, under the trained student.

    DPOTrainer evaluates exactly these pairs (eval mode, no dropout) and logs what it logs in
    training, as `eval_loss`, `eval_logps/chosen`, `eval_rewards/margins`, ...; returned without
    the `eval_` prefix. The policy is base + adapter, the reference the base loaded a second time:
    a trained adapter handed to DPOTrainer alone would be copied to serve as its own reference.
    """
    from trl import DPOTrainer

    policy, tokenizer = load_student(adapter_dir, settings.student)
    reference, _ = load_model(settings.student)
    with (
        tempfile.TemporaryDirectory() as tmp,
        completion_only_scoring() if settings.completion_only_scoring else nullcontext(),  # as in training
    ):
        args = dpo_config(settings, Path(tmp), four_bit=False, has_eval=True)
        args.per_device_eval_batch_size = len(pairs)
        trainer = DPOTrainer(
            model=policy,
            ref_model=reference,
            args=args,
            train_dataset=pairs,
            eval_dataset=pairs,
            processing_class=tokenizer,
        )
        with shared_prompt_prefix(trainer.model) if settings.share_prompt_prefix else nullcontext():
            logged = trainer.evaluate()
    return {key.removeprefix("eval_"): value for key, value in logged.items()}


def merge_and_save(adapter_dir: str | Path, target: str | Path, base: str | None = None) -> Path:
    """A standalone merged model (full precision) with its tokenizer."""
    model, tokenizer = load_student(adapter_dir, base, merge=True)
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    return Path(target)


def main(argv: list[str] | None = None) -> None:
    """`python -m fclib.train --run-name NAME`: stage 4 alone, from the run's params.yaml and pairs.

    The same code runs on several GPUs with `accelerate launch -m fclib.train --run-name NAME`: one
    process per GPU, each on its shard of the pairs; the main process writes the adapter and log.
    """

    ap = argparse.ArgumentParser(prog="python -m fclib.train", description=main.__doc__.splitlines()[0])
    ap.add_argument(
        "--run-name", required=True, help="a run of the pipeline (outputs/NAME with params.yaml and pairs/)"
    )
    ap.add_argument("--no-resume", action="store_true", help="start over instead of resuming from the last checkpoint")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_folder = runs.run_folder(args.run_name, create=False)
    params_path = run_folder / "params.yaml"
    if not params_path.is_file():
        raise SystemExit(f"{params_path} not found: run the pipeline (notebooks 01-03) for {args.run_name!r} first")
    settings = TrainSettings.from_params(yaml.safe_load(params_path.read_text()))
    info = train(run_folder / "pairs", run_folder, settings, resume=not args.no_resume)
    if info["main_process"]:
        print(json.dumps({k: info[k] for k in ("global_step", "training_loss", "trainable_parameters", "processes")}))


if __name__ == "__main__":
    main()
