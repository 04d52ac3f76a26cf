"""Preflight, called by `StageConfig.validate_paths` (every stage's `validate()`, dry runs included): refuse the
combinations known to fail late or train wrongly, from the config and the start's config.json only (no weights):
non-positive sizes, `data.max_length` beyond the model's positions (pretrain checks `data.block_size` itself), packing
where attention may ignore sample boundaries, bf16 on a GPU without it, too little disk for `save_total_limit`."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from self_model.core.backend_args import RUN_DEFAULTS
from self_model.core.errors import UserError
from self_model.core.lineage import model_config, start_of

logger = logging.getLogger("self_model")

POSITION_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")
SIZE_KEYS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
# Families whose shipped (remote) attention builds its own mask from padding only: packed samples would attend to
# each other. Their own code, not transformers', runs with trust_remote_code.
REMOTE_ATTENTION_FAMILIES = ("chatglm", "baichuan")
GB = 1024**3


def config_problems(cfg: Any) -> list[str]:
    args = getattr(cfg, "training_args", None) or {}
    data = getattr(cfg, "data", None)
    config = start_config(cfg)
    return (position_problems(data, config) + packing_problems(cfg, data, config)
            + bf16_problems(args) + sharding_problems(cfg, args) + disk_problems(cfg, args, config))


def deepspeed_zero(args: dict[str, Any]) -> tuple[str, str, dict[str, Any]] | None:
    """(key, file, zero_optimization) of training_args.deepspeed or an `accelerate launch` DeepSpeed config
    (its JSON, or its inline keys, handed to the processes as ACCELERATE_DEEPSPEED_* variables)."""
    path = args.get("deepspeed") or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    where = "training_args.deepspeed" if args.get("deepspeed") else "the accelerate DeepSpeed config"
    if isinstance(path, str) and Path(path).is_file():
        try:
            return where, path, json.loads(Path(path).read_text(encoding="utf-8")).get("zero_optimization") or {}
        except (OSError, json.JSONDecodeError):
            return None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not path:
        save = os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false").lower() == "true"
        stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
        return where, "inline", {"stage": stage, "stage3_gather_16bit_weights_on_model_save": save}
    return None


def sharding_problems(cfg: Any, args: dict[str, Any]) -> list[str]:
    """ZeRO-3 and FSDP partition the weights across processes. final/ must load with plain transformers / peft: ZeRO-3
    gathers it only with stage3_gather_16bit_weights_on_model_save (else the Trainer writes a DeepSpeed checkpoint
    there); FSDP is gathered by core.run.save_final. QLoRA with ZeRO-3 trains as with DDP (same losses, every weight
    partitioned: tests/test_distributed.py); with FSDP it is refused: FSDP shards packed 4-bit weights only with a
    float `bnb_4bit_quant_storage`, which this toolkit does not set, and FSDP cannot be tested without GPUs."""
    zero, problems = deepspeed_zero(args), []
    if zero and zero[2].get("stage") == 3 and zero[2].get("stage3_gather_16bit_weights_on_model_save") is not True:
        problems.append(f"{zero[0]} ({zero[1]}): ZeRO-3 without stage3_gather_16bit_weights_on_model_save: true "
                        "would leave final/ as a DeepSpeed checkpoint that transformers cannot load; set it to true "
                        "in zero_optimization (accelerate config: zero3_save_16bit_model: true)")
    fsdp = ("training_args.fsdp" if args.get("fsdp") or args.get("fsdp_config") else
            "the accelerate FSDP config" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" else None)
    peft = getattr(cfg, "peft", None)
    if fsdp and peft and peft.qlora:
        problems.append(f"peft.qlora with {fsdp}: FSDP shards bitsandbytes' packed 4-bit weights only with a float "
                        "bnb_4bit_quant_storage, which this toolkit does not set; use DeepSpeed ZeRO-3 for QLoRA "
                        "(config/accelerate/zero3.yaml or --deepspeed config/self_model_config/deepspeed/"
                        "ds_zero3.json), or LoRA (peft.qlora: false) with FSDP")
    return problems


def size_problems(args: dict[str, Any]) -> list[str]:
    """A field check of training_args (first pass, with typos); torch would only say 'batch_size should be...'."""
    return [f"training_args.{key}: must be a positive whole number, got {args[key]!r}; set it to 1 or more"
            for key in SIZE_KEYS if isinstance(args.get(key), int) and args[key] < 1]


def start_config(cfg: Any) -> dict[str, Any] | None:
    """The start's config.json (an adapter run: its base's); None for a hub id or an unreadable start."""
    try:
        return model_config(start_of(cfg).model)
    except (UserError, OSError, ValueError):
        return None


def model_positions(config: dict[str, Any]) -> tuple[str, int] | None:
    for section in (config, config.get("text_config") or {}):
        for key in POSITION_KEYS:
            value = section.get(key)
            if isinstance(value, int) and value > 0:
                return key, value
    return None


def position_problems(data: Any, config: dict[str, Any] | None) -> list[str]:
    length = getattr(data, "max_length", None)
    positions = model_positions(config) if config else None
    if not isinstance(length, int) or positions is None or length <= positions[1]:
        return []
    key, value = positions
    return [f"data.max_length: {length} is beyond the model's {value} positions ({key} in its config.json): tokens "
            f"past {value} have no trained position; set data.max_length: {value} or less"]


def packing_problems(cfg: Any, data: Any, config: dict[str, Any] | None) -> list[str]:
    if not getattr(data, "packing", False):
        return []
    fix = "set data.packing: false (padded batches are always correct)"
    model_type = str((config or {}).get("model_type", "")).lower()
    if getattr(cfg, "trust_remote_code", False) or (config or {}).get("auto_map") or \
            any(name in model_type for name in REMOTE_ATTENTION_FAMILIES):
        return [f"data.packing with a remote-code model (trust_remote_code / auto_map, model_type "
                f"'{model_type or '?'}'): its own attention code does not see the packed sample boundaries, so "
                f"samples would attend to each other; {fix}"]
    attention = (config or {}).get("attn_implementation") or (config or {}).get("_attn_implementation")
    if attention == "eager":
        return [f"data.packing with attn_implementation: eager (the model's config.json): per-document attention is "
                f"installed for sdpa only, and eager attention would mix the packed samples; remove "
                f"attn_implementation from config.json (sdpa is the default), or {fix}"]
    return []


def bf16_problems(args: dict[str, Any]) -> list[str]:
    if args.get("bf16") is not True:
        return []
    import torch

    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return [f"training_args.bf16: true, but this GPU ({torch.cuda.get_device_name(0)}) has no bf16; set "
                "training_args.bf16: false and training_args.fp16: true (or train on an Ampere or newer GPU)"]
    return []  # on a CPU, core.modeling.pick_precision falls back by itself


def parameter_count(config: dict[str, Any]) -> int | None:
    """Parameters of a decoder from its config.json sizes (embeddings, attention, gated MLP); None if unknown."""
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    vocab, inner = config.get("vocab_size"), config.get("intermediate_size")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, vocab)):
        return None
    heads = config.get("num_attention_heads") or 1
    kv_dim = (config.get("num_key_value_heads") or heads) * (config.get("head_dim") or hidden // heads)
    inner = inner if isinstance(inner, int) else 4 * hidden
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * inner
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return layers * per_layer + embeddings


def free_bytes(folder: Path) -> int:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def disk_problems(cfg: Any, args: dict[str, Any], config: dict[str, Any] | None) -> list[str]:
    """Full training only: a LoRA checkpoint is small next to the model. A checkpoint holds the weights (in the
    config's dtype) and Adam's two fp32 moments; final/ holds the weights once more."""
    params = parameter_count(config) if config else None
    peft = getattr(cfg, "peft", None)
    if params is None or (peft is not None and peft.enabled) or not args.get("output_dir"):
        return []
    keep = args.get("save_total_limit", RUN_DEFAULTS["save_total_limit"])
    saves = 0 if args.get("save_strategy") == "no" else keep
    if not isinstance(saves, int) or saves < 0:
        return []  # null: every checkpoint is kept, which no estimate can bound
    weight_bytes = 4 if str(config.get("torch_dtype") or config.get("dtype")) == "float32" else 2  # type: ignore[union-attr]
    need = saves * params * (weight_bytes + 8) + params * weight_bytes
    free = free_bytes(Path(args["output_dir"]))
    if need <= free:
        return []
    return [f"training_args.save_total_limit: {saves} checkpoint(s) of this model (~{params / 1e9:.2f}B parameters: "
            f"weights + optimizer state each) and final/ need about {need / GB:.1f} GiB, but "
            f"{args['output_dir']} has {free / GB:.1f} GiB free; lower training_args.save_total_limit, train LoRA "
            f"(peft.enabled: true), or choose a training_args.output_dir on a larger disk"]
