"""Loading tokenizers and models, LoRA / QLoRA, and choosing the chat template."""

from __future__ import annotations

import logging
from typing import Any

import torch

from self_model.core.errors import UserError
from self_model.core.stage_config import PeftConfig, StageConfig

logger = logging.getLogger("self_model")


def load_tokenizer(cfg: StageConfig) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"tokenizer_name_or_path: cannot load a tokenizer from '{cfg.tokenizer_path}': {exc}\n"
                        "If it needs code from the hub (ChatGLM3, Baichuan2), set trust_remote_code: true.") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any token will do; eos is the convention.
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer has no pad token; using eos %r for padding", tokenizer.eos_token)
    return tokenizer


def pick_precision(training_args: dict[str, Any]) -> torch.dtype:
    """Turn a GPU precision setting into one that works here; returns the dtype to load weights in.

    On a machine without CUDA, fp16/bf16 training is hundreds of times slower (or fails), so a config
    written for a GPU runs in fp32 with a warning instead of crashing.
    """
    if not torch.cuda.is_available():
        wanted = [k for k in ("fp16", "bf16") if training_args.get(k)]
        if wanted:
            logger.warning("training_args.%s: true needs a GPU; no CUDA device here, so this run trains in fp32",
                           "/".join(wanted))
            for key in wanted:
                training_args[key] = False
        # accelerate only sees several CPU processes (torchrun, deepspeed) as a distributed run with use_cpu.
        training_args.setdefault("use_cpu", True)
        return torch.float32
    if training_args.get("bf16"):
        return torch.bfloat16
    return torch.float32  # fp16 mixed precision keeps fp32 master weights


def quantization_config(peft: PeftConfig, compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=peft.quant_type,
                              bnb_4bit_use_double_quant=peft.double_quant, bnb_4bit_compute_dtype=compute_dtype)


def init_deepspeed_comm(args: Any) -> None:
    """Call before loading a model under DeepSpeed. ZeRO-3 partitions the weights while they load
    (`deepspeed.zero.Init`), which needs DeepSpeed's own process group: accelerate starts it on GPUs, but for CPU
    processes it starts only torch's (gloo), and ZeRO-3 would then count one process and fail its batch check."""
    if not getattr(args, "deepspeed", None) or args.world_size <= 1:  # world_size starts torch.distributed
        return
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the existing group


def load_causal_lm(cfg: StageConfig, dtype: torch.dtype, model_path: str | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    path = model_path or cfg.model_name_or_path
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.peft.qlora:
        kwargs["quantization_config"] = quantization_config(cfg.peft, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"model_name_or_path: cannot load a causal LM from '{path}': {exc}") from None
    model.config.use_cache = False  # training: a KV cache only costs memory (and disables packed masks)
    if cfg.peft.qlora and not torch.cuda.is_available():
        # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights into an inference-only layout on the first
        # eval-mode forward (evaluation, DPO reference scoring), after which a training forward fails.
        for module in model.modules():
            if getattr(module, "support_avx512bf16_for_cpu", False):
                module.support_avx512bf16_for_cpu = False
    return model


def check_vocab(model: Any, tokenizer: Any) -> None:
    """A tokenizer with more tokens than the model has embedding rows would index out of range."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings have {rows} rows: they do not "
            "belong together. Use the tokenizer saved with this model, or grow the model first "
            "(tokenizer/resize_model.py, or continued pretraining, which resizes embeddings)."
        )


def linear_module_names(model: Any) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    try:
        import bitsandbytes as bnb

        names |= {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    except ImportError:
        pass
    return sorted(names)


def apply_peft(model: Any, peft: PeftConfig, gradient_checkpointing: bool = False,
               task_type: str | None = "CAUSAL_LM") -> Any:
    """Wrap the model with a LoRA adapter (QLoRA when the base is 4-bit); a no-op for full fine-tuning.

    `task_type=None` wraps any model (e.g. a masked LM). When `modules_to_save` holds the input embeddings of a
    model with tied input/output embeddings, peft is asked to keep the two tied (one trained copy, not two).
    """
    if not peft.enabled:
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_target_modules(model, peft)
    if peft.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return get_peft_model(model, lora_config(model, peft, task_type))


def check_target_modules(model: Any, peft: PeftConfig) -> None:
    if isinstance(peft.target_modules, list):
        available = linear_module_names(model)
        missing = [m for m in peft.target_modules if m not in available]
        if missing:
            raise UserError(f"peft.target_modules: {missing} are not linear layers of this model; "
                            f"available: {available} (or use all-linear)")


def lora_config(model: Any, peft: PeftConfig, task_type: str | None = "CAUSAL_LM") -> Any:
    """The peft `LoraConfig` for the `peft:` section (for trainers that wrap the model themselves, like trl's)."""
    from peft import LoraConfig

    extra: dict[str, Any] = {}
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    embedding = module_name(model, model.get_input_embeddings()).rsplit(".", 1)[-1]
    if tied and any(m.rsplit(".", 1)[-1] == embedding for m in peft.modules_to_save or []) and \
            "ensure_weight_tying" in LoraConfig.__dataclass_fields__:
        extra["ensure_weight_tying"] = True
    return LoraConfig(r=peft.lora_r, lora_alpha=peft.lora_alpha, lora_dropout=peft.lora_dropout,
                      target_modules=peft.target_modules, task_type=task_type, **extra,
                      modules_to_save=list(peft.modules_to_save) if peft.modules_to_save else None)


def module_name(model: Any, module: Any) -> str:
    """The dotted name of `module` inside `model` ('' when it is not there)."""
    return next((name for name, mod in model.named_modules() if mod is module), "")


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total

