"""eval.yaml: the models to compare and the three optional kinds of evaluation (lm-eval, perplexity, generation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from self_model.core.config import existing_files
from self_model.core.corpus import corpus_problems
from self_model.core.inference import GenerationSettings
from self_model.core.stage_config import local_or_hub

ROOT = Path(__file__).resolve().parents[2]
LOCAL_TASKS = ROOT / "config" / "eval_tasks"


def models_check(value: list[str], path: str) -> list[str]:
    if not value:
        return [f"{path}: name at least one model (a run folder, its final/, an export or a hub id)"]
    return [p for i, model in enumerate(value) for p in local_or_hub(model, f"{path}[{i}]")]


def names_check(value: list[str], path: str) -> list[str]:
    return [f"{path}: names must differ, got {value}"] if len(set(value)) != len(value) else []


def corpus_check(value: list[str], path: str) -> list[str]:
    return corpus_problems(value, path) if value else []


@dataclass
class HarnessSection:
    """`harness:` lm-evaluation-harness tasks, by name (lm-eval's own, where the machine has their data) or the
    project's local task YAMLs under `include_path`."""

    tasks: list[str] = field(default_factory=list)  # empty: no lm-eval
    include_path: list[str] = field(default_factory=lambda: [str(LOCAL_TASKS)])
    num_fewshot: int | None = None
    limit: int | None = None  # questions per task (a quick look); null: all
    batch_size: int = 8
    apply_chat_template: bool = False  # CMMLU / MMLU-style tasks score the bare "答案：" continuation


@dataclass
class PerplexitySection:
    """`perplexity:` exp(mean next-token loss) on held-out text (.txt lines, .jsonl `text_fields`)."""

    files: list[str] = field(default_factory=list, metadata={"check": corpus_check})  # empty: no perplexity
    text_fields: list[str] = field(default_factory=lambda: ["text"])
    max_tokens: int = 4096
    block_size: int = 256


@dataclass
class GenerationSection:
    """`generation:` answers to questions with reference answers, scored against them."""

    question_file: str | None = field(default=None, metadata={"check": existing_files})  # null: no generation
    format: str = "auto"  # auto / sharegpt / messages / alpaca (the last assistant turn is the reference)
    batch_size: int = 8
    settings: GenerationSettings = field(default_factory=lambda: GenerationSettings(temperature=0.0,
                                                                                    max_new_tokens=256))
    # An answer containing any of these counts as a refusal.
    refusal_markers: list[str] = field(default_factory=lambda: [
        "抱歉", "对不起", "无法回答", "不能回答", "无法提供", "作为一个AI", "作为AI",
        "I'm sorry", "I cannot", "I can't"])
    side_by_side: int = 20  # prompts shown with every model's answer in the report


@dataclass
class EvalConfig:
    models: list[str] = field(metadata={"check": models_check})
    output_dir: str = "self_model/checkpoints/eval/report"  # never overwritten; written as <output_dir>.tmp
    names: list[str] = field(default_factory=list, metadata={"check": names_check})  # column names; default: paths
    # A project template JSON for a model saved without a chat template (a base model), used for generation.
    template_path: str | None = field(default=None, metadata={"check": existing_files})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    harness: HarnessSection = field(default_factory=HarnessSection)
    perplexity: PerplexitySection = field(default_factory=PerplexitySection)
    generation: GenerationSection = field(default_factory=GenerationSection)

    def validate(self) -> list[str]:
        problems = []
        if self.names and len(self.names) != len(self.models):
            problems.append(f"names: {len(self.names)} names for {len(self.models)} models")
        if not (self.harness.tasks or self.perplexity.files or self.generation.question_file):
            problems.append("nothing to evaluate: set harness.tasks, perplexity.files or generation.question_file")
        return problems

    def model_names(self) -> list[str]:
        return self.names or [display_name(m) for m in self.models]


def display_name(path: str) -> str:
    """A short column name: `runs/my-sft/final` → `my-sft/final`, a hub id as it is."""
    parts = Path(path).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else path
