"""The policy and its reference for the RLHF stages (DPO, GRPO), from a base model or from an SFT result.

The reference model, by case:
- LoRA from a base model: the base itself, by switching the adapter off (trl does this; no second copy).
- LoRA / QLoRA from an SFT adapter (`adapter_name_or_path`), *stacked*: training continues the SFT adapter, and trl
  keeps a frozen copy of it as adapter "ref", so the reference is base + SFT adapter = the SFT model.
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
from self_model.core.modeling import check_target_modules, check_vocab, load_causal_lm, lora_config
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
    adapter = cfg.adapter_name_or_path
    scored = "; scored once before training (precompute_ref_log_probs)" if precompute else ""
    if cfg.peft.enabled and adapter:
        return (f"stacked: {stage} keeps training the SFT adapter {adapter}; the reference is the base with a frozen "
                "copy of that adapter, i.e. the SFT model (the adapter's own r / alpha / target modules are used)"
                + scored)
    if cfg.peft.enabled:
        return "the base model with the LoRA adapter switched off (no second copy in memory)" + scored
    start = (f"merged: the SFT adapter {adapter} is merged into the base weights; the reference is that SFT model, "
             if adapter else "the reference is the starting model, ")
    if precompute:
        return start + "scored once before training (precompute_ref_log_probs; no reference kept in memory)"
    return start + "kept as a separate frozen copy"


def load_policy(cfg: AlignmentConfig, tokenizer: Any, dtype: torch.dtype, gradient_checkpointing: bool, stage: str,
                reference_copy: bool, precompute: bool = False) -> PolicyModels:
    """The model to train and, for full training with `reference_copy`, a frozen copy of it as the reference."""
    model = load_causal_lm(cfg, dtype)
    check_vocab(model, tokenizer)
    if cfg.peft.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    reference = describe_reference(cfg, stage, precompute)
    adapter = cfg.adapter_name_or_path
    if cfg.peft.enabled and adapter:
        model = load_adapter(model, adapter, trainable=True)
        warn_if_shape_differs(cfg, model.peft_config["default"], stage)
        return PolicyModels(model, None, None, reference)
    if cfg.peft.enabled:
        check_target_modules(model, cfg.peft)
        return PolicyModels(model, None, lora_config(model, cfg.peft), reference)
    if adapter:
        # peft froze the base weights when wrapping them; full training trains all of them.
        model = load_adapter(model, adapter, trainable=False).merge_and_unload().requires_grad_(True)
    if not reference_copy:
        return PolicyModels(model, None, None, reference)
    return PolicyModels(model, copy.deepcopy(model).eval().requires_grad_(False), None, reference)


def warn_if_shape_differs(cfg: AlignmentConfig, loaded: Any, stage: str) -> None:
    """peft.lora_* / target_modules do not apply to a continued adapter: say so when they ask for something else."""
    ours = {"lora_r": cfg.peft.lora_r, "lora_alpha": cfg.peft.lora_alpha, "target_modules": cfg.peft.target_modules}
    theirs = {"lora_r": loaded.r, "lora_alpha": loaded.lora_alpha, "target_modules": loaded.target_modules}
    differ = [k for k in ours if (sorted(ours[k]) if isinstance(ours[k], list) else ours[k]) !=
              (sorted(theirs[k]) if isinstance(theirs[k], (list, set)) else theirs[k])]
    if differ:
        logger.warning("peft.%s differ from the SFT adapter's %s; %s continues that adapter as it is (set "
                       "peft.enabled: false to merge it and train all weights instead)",
                       "/".join(differ), {k: theirs[k] for k in differ}, stage)


def load_adapter(model: Any, adapter: str, trainable: bool) -> Any:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise UserError(f"adapter_name_or_path: cannot load the LoRA adapter '{adapter}' onto model_name_or_path: "
                        f"{str(exc)[:400]}\nIs it an adapter trained on this base model?") from None


def check_reference_adapter(cfg: AlignmentConfig, model: Any) -> None:
    """After trl wrapped the model: with an SFT adapter, trl must hold a frozen copy of it (the reference)."""
    from peft import PeftModel

    if cfg.adapter_name_or_path and isinstance(model, PeftModel) and REF_ADAPTER not in model.peft_config:
        raise UserError("trl kept no frozen copy of the SFT adapter, so the reference would be the raw base model, "
                        "not the SFT model; upgrade peft (>= 0.20), or set peft.enabled: false to merge the adapter")


def drop_reference_adapter(model: Any) -> None:
    """Before saving: the frozen reference adapter is the SFT adapter, already on disk."""
    if REF_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REF_ADAPTER)
