"""The policy and its reference for the RLHF stages (DPO, GRPO), from a base model or from an SFT result.

The start is read as in every stage (`core.lineage`): `model_name_or_path` may be the SFT run's final/ (adapter or
full weights), or a base with `adapter_name_or_path`. The reference model, by case:
- LoRA from a base model (or full SFT weights): the base itself, by switching the adapter off (trl does this; no
  second copy).
- LoRA / QLoRA continuing an SFT adapter (start_adapter: continue, the default with peft.enabled), *stacked*: training
  continues the SFT adapter, and trl keeps a frozen copy of it as adapter "ref", so the reference is base + SFT
  adapter = the SFT model.
- LoRA on a merged SFT adapter (start_adapter: merge): the adapter is merged into the base in memory and a new LoRA
  trains on top; switched off, it leaves the merged SFT model: the reference.
- Full training: a separate frozen copy of the starting model (or none, when the reference is not needed). From an
  SFT adapter, the adapter is *merged* into the base weights first, so the starting model and the reference are the
  SFT model.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch

from self_model.core.errors import UserError
from self_model.core.lineage import start_of
from self_model.core.modeling import (
    attach_adapter,
    check_target_modules,
    check_vocab,
    load_start_model,
    lora_config,
    warn_if_shape_differs,
)
from self_model.rlhf.config import AlignmentConfig

logger = logging.getLogger("self_model")
REF_ADAPTER = "ref"  # the name trl gives the frozen copy of a pre-trained adapter


@dataclass
class PolicyModels:
    model: Any
    ref_model: Any | None  # a frozen copy for full training, when the trainer cannot build the right one itself
    peft_config: Any | None  # a LoraConfig for trl to wrap the model with (a new adapter)
    reference: str  # what the reference is, in words (logged, printed by --dry-run, saved with the result)


def describe_reference(cfg: AlignmentConfig, stage: str, precompute: bool = False) -> str:
    """What the reference model is for this config."""
    start = start_of(cfg)
    scored = "; scored once before training (precompute_ref_log_probs)" if precompute else ""
    if cfg.peft.enabled and start.adapter:
        return (f"stacked: {stage} keeps training the SFT adapter {start.adapter}; the reference is the base with a "
                "frozen copy of that adapter, i.e. the SFT model (the adapter's own r / alpha / target modules are "
                "used)" + scored)
    if cfg.peft.enabled and start.merged:
        return (f"merged: the SFT adapter {start.merged[-1]} is merged into the base weights and a new LoRA adapter "
                "trains on top; the reference is that adapter switched off, i.e. the SFT model" + scored)
    if cfg.peft.enabled:
        return "the base model with the LoRA adapter switched off (no second copy in memory)" + scored
    begin = (f"merged: the SFT adapter {start.merged[-1]} is merged into the base weights; the reference is that SFT "
             "model, " if start.merged else "the reference is the starting model, ")
    if precompute:
        return begin + "scored once before training (precompute_ref_log_probs; no reference kept in memory)"
    return begin + "kept as a separate frozen copy"


def load_policy(cfg: AlignmentConfig, tokenizer: Any, dtype: torch.dtype, gradient_checkpointing: bool, stage: str,
                reference_copy: bool, precompute: bool = False) -> PolicyModels:
    """The model to train and, for full training with `reference_copy`, a frozen copy of it as the reference."""
    model, start = load_start_model(cfg, dtype)  # a merged SFT adapter is already in the weights
    if cfg.peft.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    reference = describe_reference(cfg, stage, precompute)
    if start.adapter:  # start_adapter: continue (needs peft.enabled)
        model = attach_adapter(model, start.adapter, trainable=True)
        check_vocab(model, tokenizer)
        warn_if_shape_differs(cfg.peft, model.peft_config["default"], start.adapter)
        return PolicyModels(model, None, None, reference)
    check_vocab(model, tokenizer)
    if cfg.peft.enabled:
        check_target_modules(model, cfg.peft)
        return PolicyModels(model, None, lora_config(model, cfg.peft), reference)
    if start.merged:
        model.requires_grad_(True)  # peft froze the base weights when wrapping them; full training trains all of them
    if not reference_copy:
        return PolicyModels(model, None, None, reference)
    return PolicyModels(model, copy.deepcopy(model).eval().requires_grad_(False), None, reference)


def check_reference_adapter(cfg: AlignmentConfig, model: Any) -> None:
    """After trl wrapped the model: with an SFT adapter, trl must hold a frozen copy of it (the reference)."""
    from peft import PeftModel

    if start_of(cfg).adapter and isinstance(model, PeftModel) and REF_ADAPTER not in model.peft_config:
        raise UserError("trl kept no frozen copy of the SFT adapter, so the reference would be the raw base model, "
                        "not the SFT model; upgrade peft (>= 0.20), or set start_adapter: merge to merge the adapter")


def drop_reference_adapter(model: Any) -> None:
    """Before saving: the frozen reference adapter is the SFT adapter, already on disk."""
    if REF_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REF_ADAPTER)
