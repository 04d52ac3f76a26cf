"""The schema of config/self_model_config/reward.yaml (train_reward.py): the stage keys, `data:` (preference pairs, the
keys DPO's `data:` has) and `training_args:` (trl's RewardConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from self_model.core.stage_config import StageConfig
from self_model.rlhf.config import DPODataConfig, sft_adapter

REWARD_CONFIG = "trl.trainer.reward_config:RewardConfig"
# training_args keys reward.yaml sets elsewhere.
REWARD_RESERVED_ARGS = {
    "max_length": "data.max_length",
    "trust_remote_code": "the top-level trust_remote_code:",
    "model_init_kwargs": "model_name_or_path / peft.qlora (this toolkit loads the model)",
    "chat_template_path": "template_path: (the pairs are rendered with the project's template before trl sees them)",
    "eos_token": "the template's end-of-turn token ends each reply",
    "pad_token": "the tokenizer's pad token (eos when it has none)",
}


def check_reward_args(args: dict[str, Any], path: str) -> list[str]:
    from self_model.core.backend_args import RENAMED_ARGS, RESERVED_ARGS, check_backend_args

    missing = [] if "output_dir" in args else [f"{path}.output_dir: required key is missing (where the run goes)"]
    return missing + check_backend_args(args, REWARD_CONFIG, path, RENAMED_ARGS,
                                        {**RESERVED_ARGS, **REWARD_RESERVED_ARGS})


@dataclass
class RewardStageConfig(StageConfig):
    """reward.yaml: a reward model (one score per prompt + reply) from a base model or an SFT result.

    The start works as in every stage (core.lineage). An SFT LoRA adapter is merged into the base (start_adapter:
    merge): the reward model is the SFT model with a score head, trained in full or with a new LoRA.
    """

    adapter_name_or_path: str | None = field(default=None, metadata={"check": sft_adapter})
    # Preference pairs in any format DPO reads (sharegpt, messages, prompt, implicit); the same length policy.
    data: DPODataConfig = field(default=None, metadata={"required": True})  # type: ignore[assignment]
    # Passed to trl's RewardConfig and checked against its fields (center_rewards_coefficient, ...).
    training_args: dict[str, Any] = field(default_factory=dict, metadata={"check": check_reward_args})

    def __post_init__(self) -> None:
        if self.start_adapter == "auto":
            self.start_adapter = "merge"  # an SFT adapter is a language-model adapter: it becomes part of the start

    def validate(self) -> list[str]:
        errors = self.validate_paths()
        if self.start_adapter == "continue":
            errors.append("start_adapter: continue would keep training the SFT adapter (a language-model adapter); a "
                          "reward model merges it into its start and trains a score head: set start_adapter: merge")
        return errors
