"""The YAML keys every training stage shares: model, tokenizer, template, `peft:`, `trace:`, `training_args:`.

A stage's own sections live in its package (`self_model/<stage>/config.py`) and subclass `StageConfig`. Backend
arguments (`training_args:`) are not re-declared: they are checked against the backend's own class
(`transformers.TrainingArguments`, trl's `DPOConfig`, ...) by `self_model.core.backend_args`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from self_model.core.backend_args import check_training_args
from self_model.core.config import existing_files
from self_model.core.lineage import is_adapter, result_folder
from self_model.core.preflight import config_problems, size_problems
from self_model.core.tracking import trace_problems


def check_transformers_args(args: dict[str, Any], path: str) -> list[str]:
    missing = [] if "output_dir" in args else [f"{path}.output_dir: required key is missing (where the run goes)"]
    return missing + check_training_args(args) + size_problems(args)


def at_least_one(value: int, path: str) -> list[str]:
    return [] if value >= 1 else [f"{path}: expected a whole number of at least 1, got {value}"]


def local_or_hub(value: str, path: str) -> list[str]:
    """A local folder, or something shaped like a hub id (org/name); a missing local path is named now."""
    if Path(value).exists() or (value.count("/") == 1 and not value.startswith((".", "/", "~"))):
        return []
    hint = ""
    if "tiny" in value:
        hint = ("; build the embedded tiny model with: "
                f"uv run python self_model/tools/make_tiny_model.py --output {value}")
    return [f"{path}: no such folder: {value} (and not a hub id of the form org/name){hint}"]


def adapter_folder(value: str, path: str) -> list[str]:
    """Field check: a LoRA adapter folder (adapter_config.json; a run folder means its final/), or a hub id."""
    folder = Path(result_folder(value))
    if folder.is_dir():
        if is_adapter(folder):
            return []
        return [f"{path}: {value} holds no adapter_config.json, so it is not a LoRA adapter; full weights (a full "
                "run's final/ or a merged export) go into model_name_or_path instead"]
    if value.count("/") == 1 and not value.startswith((".", "/", "~")):
        return []
    return [f"{path}: no such folder: {value} (a LoRA run's final/ folder, or a hub id of the form org/name)"]


@dataclass
class PeftConfig:
    """`peft:` LoRA / QLoRA. Disabled means full fine-tuning."""

    enabled: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # Module names to adapt, or "all-linear" for every linear layer but the LM head.
    target_modules: list[str] | str = "all-linear"
    # Modules trained in full next to the adapter (e.g. embed_tokens, lm_head after vocabulary growth).
    modules_to_save: list[str] | None = None
    # 4-bit base weights (bitsandbytes); needs enabled: true.
    qlora: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True

    def __post_init__(self) -> None:
        if self.qlora and not self.enabled:
            raise ValueError("peft.qlora: true needs peft.enabled: true (QLoRA trains a LoRA adapter on a 4-bit base)")
        if self.lora_r <= 0:
            raise ValueError(f"peft.lora_r must be positive, got {self.lora_r}")


@dataclass
class ChatDataConfig:
    """The `data:` keys SFT and DPO share: files, length limit and its policy, format, sample cap."""

    train_file: str | list[str] = field(metadata={"check": existing_files})
    eval_file: str | list[str] | None = field(default=None, metadata={"check": existing_files})
    # Longest sample in tokens (DPO: prompt + reply, chosen and rejected each); longer ones follow `truncation`.
    max_length: int = 1024
    # auto detects each row's format; or one of the registered formats (see README).
    format: str = "auto"
    # truncate: cut at max_length; drop: leave the sample out. Both are counted and reported.
    truncation: Literal["truncate", "drop"] = "truncate"
    # Use at most this many training rows (quick experiments).
    max_samples: int | None = None

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ValueError(f"data.max_length must be at least 8, got {self.max_length}")




@dataclass
class StageConfig:
    """Keys every training stage shares."""

    # A base model (folder or hub id), or a previous run's result to start from: its final/ (or the run folder),
    # a checkpoint-N/ or an export, full weights or a LoRA adapter (see start_adapter; README "Chaining stages").
    model_name_or_path: str = field(metadata={"check": local_or_hub})
    # A LoRA adapter to start from, on the base in model_name_or_path. Not needed when model_name_or_path points at
    # the adapter's run itself: its base is then read from the run (run_info.json) or from adapter_config.json.
    adapter_name_or_path: str | None = field(default=None, metadata={"check": adapter_folder})
    # What a starting adapter becomes: continue = train that same adapter further (its own r / alpha / targets;
    # needs peft.enabled); merge = merge it into the base weights in memory, then train what peft: says (a new LoRA
    # or all weights). auto: continue with peft.enabled, merge without.
    start_adapter: Literal["auto", "continue", "merge"] = "auto"
    tokenizer_name_or_path: str | None = field(default=None, metadata={"check": local_or_hub})
    # A template file (self_model/template/*.json or your own) ...
    template_path: str | None = field(default=None, metadata={"check": existing_files})
    # ... or a shipped template by name. Neither: the tokenizer's own chat_template.
    template: str | None = None
    peft: PeftConfig = field(default_factory=PeftConfig)
    # Checked when the config loads (installed, its config/trace_config/ file valid, a key for online modes).
    trace: Literal["none", "wandb", "swanlab"] = field(default="none", metadata={"check": trace_problems})
    # Run code shipped with a hub model (ChatGLM3, Baichuan2). Off unless you trust the repository.
    trust_remote_code: bool = False
    # Passed to the backend's arguments class and checked against its fields.
    training_args: dict[str, Any] = field(default_factory=dict, metadata={"check": check_transformers_args})
    # Stop training after this many logged steps in a row with a non-finite loss or gradient norm (core/run.py
    # RunGuard): no checkpoint is saved from then on and no final/ is written. 1 stops at the first one.
    divergence_patience: int = field(default=1, metadata={"check": at_least_one})

    @property
    def tokenizer_path(self) -> str:
        """tokenizer_name_or_path, else the starting adapter's folder when it holds a tokenizer (its vocabulary and
        chat template are what it was trained with), else the model's (a run folder: its final/)."""
        if self.tokenizer_name_or_path:
            return self.tokenizer_name_or_path
        if self.adapter_name_or_path:
            adapter = result_folder(self.adapter_name_or_path)
            if (Path(adapter) / "tokenizer_config.json").is_file():
                return adapter
        return result_folder(self.model_name_or_path)

    def validate_paths(self) -> list[str]:
        errors = []
        if self.template_path and self.template:
            errors.append("template / template_path: set one of them, not both")
        starts_from_adapter = bool(self.adapter_name_or_path) or is_adapter(result_folder(self.model_name_or_path))
        if starts_from_adapter and self.start_adapter == "continue" and not self.peft.enabled:
            errors.append("start_adapter: continue keeps training the starting LoRA adapter, which needs "
                          "peft.enabled: true; or set start_adapter: merge to merge it and train all weights")
        if starts_from_adapter and self.peft.qlora and self.start_adapter == "merge":
            errors.append("start_adapter: merge with peft.qlora: an adapter cannot be merged into 4-bit weights; "
                          "export the merged model first (self_model/tools/export_model.py) and start from it, or "
                          "set start_adapter: continue")
        return errors + config_problems(self)  # core/preflight.py: known-bad combinations, before weights load


