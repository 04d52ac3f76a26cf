"""pipeline.yaml: the stages of a whole run, each naming its kind, its own stage YAML and overrides.

    output_dir: self_model/checkpoints/pipeline      # each stage writes <output_dir>/<stage name>/
    base_model: self_model/checkpoints/tiny_qwen2     # the chain's first model (a folder or hub id)
    stages:
      - {name: cpt, kind: pretrain, config: config/self_model_config/pretrain.yaml,
         overrides: {training_args.num_train_epochs: 8}}
      - {name: sft, kind: finetune, config: config/self_model_config/finetune.yaml}

The keys a stage gets from the stages before it (its starting model, tokenizer, corpus, output folder) are set by
the pipeline (`pipeline_stages.py`); `overrides:` come after them and win.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from self_model.core.config import did_you_mean, existing_files
from self_model.core.stage_config import local_or_hub

STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def optional_file(value: str | None, path: str) -> list[str]:
    return existing_files(value, path) if value else []


@dataclass
class StageEntry:
    """One item of `stages:`."""

    # The stage's name: its output folder (<output_dir>/<name>) and what --from / --only take.
    name: str
    # What runs: process_data, vocab, pretrain, finetune, dpo, grpo, export, evaluate, chat.
    kind: str
    # The stage's own YAML (the file its script takes with --config); null: the kind's defaults and overrides only.
    config: str | None = field(default=None, metadata={"check": optional_file})
    # Dotted keys of that YAML and their values, applied after the pipeline's wiring.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineConfig:
    """config/self_model_config/pipeline.yaml."""

    stages: list[StageEntry]
    # The model the chain starts from: a folder or a hub id.
    base_model: str = field(metadata={"check": local_or_hub})
    # Every stage writes <output_dir>/<stage name>/; pipeline_summary.json and .md go here too.
    output_dir: str = "self_model/checkpoints/pipeline"

    def validate(self) -> list[str]:
        from self_model.tools.pipeline_stages import KINDS  # the registry imports torch-free modules only

        errors, seen = [], set()
        for i, stage in enumerate(self.stages):
            where = f"stages[{i}]"
            if not STAGE_NAME.match(stage.name):
                errors.append(f"{where}.name: {stage.name!r} must be a folder name (letters, digits, _ . -)")
            if stage.name in seen:
                errors.append(f"{where}.name: '{stage.name}' is used twice; every stage needs its own name")
            seen.add(stage.name)
            if stage.kind not in KINDS:
                errors.append(f"{where}.kind: unknown stage kind '{stage.kind}'{did_you_mean(stage.kind, KINDS)}; "
                              f"known: {sorted(KINDS)}")
            elif stage.config is None and KINDS[stage.kind].needs_config:
                errors.append(f"{where}.config: required for a {stage.kind} stage (its stage YAML, e.g. "
                              f"{KINDS[stage.kind].example_config})")
        if not self.stages:
            errors.append("stages: empty; list at least one stage")
        return errors

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage_dir(self, name: str) -> Path:
        return Path(self.output_dir) / name
