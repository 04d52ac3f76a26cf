"""The YAML sections of continued pretraining (config/self_model_config/pretrain.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from self_model.core.corpus import corpus_paths
from self_model.core.dataset_mix import DatasetRef, Mix
from self_model.core.stage_config import StageConfig, check_data_source


@dataclass
class PretrainDataConfig:
    """`data:` for continued pretraining."""

    # A file, a folder (every .txt / .jsonl inside) or a glob, or a list of them; or `datasets:` below.
    train_file: str | list[str] | None = field(default=None, metadata={"check": corpus_paths})
    eval_file: str | list[str] | None = field(default=None, metadata={"check": corpus_paths})
    # JSONL: the fields present in a row, joined in this order; with none, a messages / conversations record.
    text_fields: list[str] = field(default_factory=lambda: ["text"])
    # Data sets by name (dataset_registry) with weights / caps, mixed by `mix` (README "Datasets by name and mixing").
    datasets: list[DatasetRef] | None = None
    mix: Mix = "concat"
    dataset_registry: str = "config/datasets.yaml"
    mix_seed: int = field(default=42, init=False)  # training_args.seed, set by validate()
    # Documents are joined with EOS and cut into blocks of this many tokens.
    block_size: int = 1024
    # The tokens left over after the last full block: drop them, or keep them in a padded block (reported).
    remainder: Literal["drop", "pad"] = "drop"
    # Read, tokenize and group on the fly (an iterable dataset); needs training_args.max_steps.
    streaming: bool = False
    # Tokenization processes; null: all cores (up to 8) above 20,000 documents.
    num_proc: int | None = None
    # Where tokenized corpora are cached (keyed by files, tokenizer and block_size); null: ~/.cache/self_model.
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.block_size < 8:
            raise ValueError(f"data.block_size must be at least 8, got {self.block_size}")
        if not self.text_fields:
            raise ValueError("data.text_fields must name at least one field (e.g. [text])")
        check_data_source(self, "data")
        if self.streaming and self.datasets:
            raise ValueError("data.streaming with data.datasets: a mix reads every data set first; set streaming: "
                             "false")


@dataclass
class PretrainConfig(StageConfig):
    """config/self_model_config/pretrain.yaml"""

    data: PretrainDataConfig = field(default=None, metadata={"required": True})  # type: ignore[assignment]
    # clm: causal LM (next token); mlm: masked LM for BERT-style encoders.
    objective: Literal["clm", "mlm"] = "clm"
    # mlm: the share of tokens masked in each block.
    mlm_probability: float = 0.15

    def validate(self) -> list[str]:
        errors = []
        self.data.mix_seed = int(self.training_args.get("seed", 42))  # the data mix follows the run's seed
        if self.template_path or self.template:
            errors.append("template / template_path: continued pretraining trains plain text; remove the key")
        if not 0.0 < self.mlm_probability < 1.0:
            errors.append(f"mlm_probability: expected a number between 0 and 1, got {self.mlm_probability}")
        max_steps = self.training_args.get("max_steps")
        if self.data.streaming and not (isinstance(max_steps, int) and max_steps > 0):
            errors.append("data.streaming: true needs training_args.max_steps (a stream has no length, so "
                          "epochs cannot be counted)")
        ds = self.training_args.get("deepspeed")
        if isinstance(ds, str) and not Path(ds).is_file():
            errors.append(f"training_args.deepspeed: file not found: {ds} "
                          "(shipped in config/self_model_config/deepspeed/: ds_config.json (ZeRO-2, the original "
                          "guide's name), ds_zero2.json, ds_zero3.json, ds_zero3_offload.json)")
        return errors

