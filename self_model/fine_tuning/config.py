"""The YAML sections of supervised fine-tuning (config/self_model_config/finetune.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from self_model.core.stage_config import ChatDataConfig, StageConfig


@dataclass
class SFTDataConfig(ChatDataConfig):
    """`data:` for supervised fine-tuning."""

    # Train only the last assistant turn of multi-turn samples.
    mask_history: bool = False
    # Padding-free packing: a batch is one row of concatenated samples that never attend to each other.
    packing: bool = False
    # Processes for tokenization; null uses all cores for large files.
    num_proc: int | None = None



@dataclass
class FinetuneConfig(StageConfig):
    """config/self_model_config/finetune.yaml"""

    data: SFTDataConfig = field(default=None, metadata={"required": True})  # type: ignore[assignment]

    def validate(self) -> list[str]:
        return self.validate_paths()

