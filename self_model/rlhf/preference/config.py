"""The schema of config/self_model_config/preference.yaml (train_preference.py): the stage keys, `loss:` (kto, orpo,
simpo), `beta`, `data:` (the keys DPO's `data:` has) and `training_args:`, checked against the trl class of the loss.

    loss     trl trainer                       data                                              reference model
    kto      trl.KTOTrainer                    unpaired rows with label / kto_tag, or pairs split  yes (as DPO's)
    orpo     trl.experimental.orpo.ORPOTrainer pairs                                              none
    simpo    trl.experimental.cpo.CPOTrainer   pairs (CPO with loss_type simpo, cpo_alpha 0)      none
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from self_model.core.stage_config import StageConfig, wrapped_init_problem
from self_model.rlhf.config import DPODataConfig, sft_adapter

# loss -> the trl arguments class its training_args are checked against and built with.
LOSS_CONFIGS = {
    "kto": "trl.trainer.kto_config:KTOConfig",
    "orpo": "trl.experimental.orpo.orpo_config:ORPOConfig",
    "simpo": "trl.experimental.cpo.cpo_config:CPOConfig",
}
# training_args keys preference.yaml sets elsewhere.
RESERVED = {
    "beta": "the top-level beta:",
    "max_length": "data.max_length",
    "max_completion_length": "data.max_length (prompt + reply; the pairs are tokenized before trl sees them)",
    "max_prompt_length": "data.max_length (prompt + reply; the pairs are tokenized before trl sees them)",
    "trust_remote_code": "the top-level trust_remote_code:",
    "model_init_kwargs": "model_name_or_path / peft.qlora (this toolkit loads the model)",
    "is_encoder_decoder": "the model's own config (decoder-only models)",
}
SIMPO_RESERVED = {"loss_type": "loss: simpo (trl's CPOTrainer with loss_type simpo)"}


def check_loss(value: str, path: str) -> list[str]:
    from self_model.core.config import did_you_mean

    if value in LOSS_CONFIGS:
        return []
    hint = " (DPO and its variants: self_model/rlhf/train_dpo.py, loss_type:)" if "dpo" in value.lower() else ""
    return [f"{path}: unknown loss {value!r}{did_you_mean(value, LOSS_CONFIGS)}; one of {list(LOSS_CONFIGS)}{hint}"]


@dataclass
class PreferenceStageConfig(StageConfig):
    """preference.yaml: KTO, ORPO or SimPO from a base model or an SFT result (as DPO starts; README "KTO, ORPO,
    SimPO")."""

    adapter_name_or_path: str | None = field(default=None, metadata={"check": sft_adapter})
    # kto (unpaired rows marked desirable or not; pairs are split), orpo or simpo (pairs; no reference model).
    loss: str = field(default="kto", metadata={"check": check_loss})
    # kto: how far the policy may move from the reference; orpo: the weight of the odds-ratio term (lambda);
    # simpo: the reward scale (the SimPO paper uses 2.0-2.5; the margin is training_args.simpo_gamma).
    beta: float = 0.1
    # KTO rows ({"messages": [..., assistant], "label": true}; sharegpt "conversations" + "kto_tag"; or "prompt" +
    # "completion" + "label") or preference pairs in any format DPO reads.
    data: DPODataConfig = field(default=None, metadata={"required": True})  # type: ignore[assignment]
    # Checked against the loss's trl class (KTOConfig, ORPOConfig, CPOConfig) by validate(): it depends on loss.
    training_args: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> list[str]:
        from self_model.core.backend_args import RENAMED_ARGS, RESERVED_ARGS, check_backend_args
        from self_model.core.preflight import size_problems

        errors = self.validate_paths() + [p for p in [wrapped_init_problem(self.peft)] if p]
        if self.beta <= 0:
            errors.append(f"beta: expected a positive number, got {self.beta}")
        if self.loss not in LOSS_CONFIGS:
            return errors  # reported by the field check
        args = self.training_args
        if "output_dir" not in args:
            errors.append("training_args.output_dir: required key is missing (where the run goes)")
        reserved = {**RESERVED_ARGS, **RESERVED, **(SIMPO_RESERVED if self.loss == "simpo" else {})}
        errors += check_backend_args(args, LOSS_CONFIGS[self.loss], "training_args", RENAMED_ARGS, reserved)
        return errors + size_problems(args)
