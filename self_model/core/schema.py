"""The YAML schema of each stage: one section, one dataclass.

Fields shared by every stage live in `StageConfig`; a stage adds its own `data:` section. Backend
arguments (`training_args:`) are not re-declared here: they are checked against the backend's own
class (`transformers.TrainingArguments`, trl's `DPOConfig`, ...) by `self_model.core.training`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from self_model.core.backend_args import check_training_args
from self_model.core.config import existing_files
from self_model.core.rl_checks import grpo_args_problems, override_problems, reward_specs

TRACE_BACKENDS = ("none", "wandb", "swanlab")


def check_transformers_args(args: dict[str, Any], path: str) -> list[str]:
    missing = [] if "output_dir" in args else [f"{path}.output_dir: required key is missing (where the run goes)"]
    return missing + check_training_args(args)


def local_or_hub(value: str, path: str) -> list[str]:
    """A local folder, or something shaped like a hub id (org/name); a missing local path is named now."""
    if Path(value).exists() or (value.count("/") == 1 and not value.startswith((".", "/", "~"))):
        return []
    hint = ""
    if "tiny" in value:
        hint = ("; build the embedded tiny model with: "
                f"uv run python self_model/tools/make_tiny_model.py --output {value}")
    return [f"{path}: no such folder: {value} (and not a hub id of the form org/name){hint}"]


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
class SFTDataConfig(ChatDataConfig):
    """`data:` for supervised fine-tuning."""

    # Train only the last assistant turn of multi-turn samples.
    mask_history: bool = False
    # Padding-free packing: a batch is one row of concatenated samples that never attend to each other.
    packing: bool = False
    # Processes for tokenization; null uses all cores for large files.
    num_proc: int | None = None


@dataclass
class StageConfig:
    """Keys every training stage shares."""

    model_name_or_path: str = field(metadata={"check": local_or_hub})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"check": local_or_hub})
    # A template file (self_model/template/*.json or your own) ...
    template_path: str | None = field(default=None, metadata={"check": existing_files})
    # ... or a shipped template by name. Neither: the tokenizer's own chat_template.
    template: str | None = None
    peft: PeftConfig = field(default_factory=PeftConfig)
    trace: Literal["none", "wandb", "swanlab"] = "none"
    # Run code shipped with a hub model (ChatGLM3, Baichuan2). Off unless you trust the repository.
    trust_remote_code: bool = False
    # Passed to the backend's arguments class and checked against its fields.
    training_args: dict[str, Any] = field(default_factory=dict, metadata={"check": check_transformers_args})

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer_name_or_path or self.model_name_or_path

    def validate_paths(self) -> list[str]:
        if self.template_path and self.template:
            return ["template / template_path: set one of them, not both"]
        return []


@dataclass
class FinetuneConfig(StageConfig):
    """config/self_model_config/finetune.yaml"""

    data: SFTDataConfig = field(default=None, metadata={"required": True})  # type: ignore[assignment]

    def validate(self) -> list[str]:
        return self.validate_paths()


# ---- continued pretraining -----------------------------------------------------------------------------
def corpus_paths(value: str | list[str], path: str) -> list[str]:
    """Field check: each entry is a file, a folder or a glob naming at least one .txt / .jsonl file."""
    from self_model.core.corpus import corpus_problems

    return corpus_problems(value, path)


@dataclass
class PretrainDataConfig:
    """`data:` for continued pretraining."""

    # A file, a folder (every .txt / .jsonl inside) or a glob, or a list of them.
    train_file: str | list[str] = field(metadata={"check": corpus_paths})
    eval_file: str | list[str] | None = field(default=None, metadata={"check": corpus_paths})
    # JSONL: the fields present in a row, joined in this order; with none, a messages / conversations record.
    text_fields: list[str] = field(default_factory=lambda: ["text"])
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
                          "(shipped: config/self_model_config/deepspeed/ds_zero2.json, ds_zero3.json, "
                          "ds_zero3_offload.json)")
        return errors


# ---- RLHF: DPO, and the ppo: section of PPO / GRPO (config/self_model_config/rlhf.yaml) -------------------
DPO_CONFIG = "trl.trainer.dpo_config:DPOConfig"
DPO_TRAINER = "trl.trainer.dpo_trainer"
# training_args keys rlhf.yaml sets elsewhere, and keys older DPO tutorials use that trl 1.x rejects.
DPO_RESERVED_ARGS = {
    "beta": "the top-level beta:",
    "loss_type": "the top-level loss_type:",
    "max_length": "data.max_length",
    "truncation_mode": "data.truncation",
    "trust_remote_code": "the top-level trust_remote_code:",
    "model_init_kwargs": "model_name_or_path / peft.qlora (this toolkit loads the model)",
}
_NO_SPLIT_LIMITS = "trl 1.x has no separate limit; data.max_length bounds prompt + reply (see data.truncation)"
DPO_RENAMED_ARGS = {
    "max_prompt_length": _NO_SPLIT_LIMITS,
    "max_completion_length": _NO_SPLIT_LIMITS,
    "max_target_length": _NO_SPLIT_LIMITS,
    "rpo_alpha": "use loss_type: [sigmoid, sft] with training_args.loss_weights: [1.0, <rpo_alpha>]",
}


def check_dpo_args(args: dict[str, Any], path: str) -> list[str]:
    from self_model.core.backend_args import RENAMED_ARGS, RESERVED_ARGS, check_backend_args

    missing = [] if "output_dir" in args else [f"{path}.output_dir: required key is missing (where the run goes)"]
    return missing + check_backend_args(args, DPO_CONFIG, path, {**RENAMED_ARGS, **DPO_RENAMED_ARGS},
                                        {**RESERVED_ARGS, **DPO_RESERVED_ARGS})


def dpo_loss_types() -> list[str]:
    """The loss types the installed trl's DPOTrainer implements, read from its source (never hard-coded)."""
    from self_model.core.backend_args import compared_strings

    return compared_strings(DPO_TRAINER, "loss_type")


def check_loss_type(value: str | list[str], path: str) -> list[str]:
    from self_model.core.config import did_you_mean

    names = [value] if isinstance(value, str) else value
    if not names:
        return [f"{path}: name at least one loss type (e.g. sigmoid)"]
    valid = dpo_loss_types()
    return [f"{path}: unknown loss type {name!r}{did_you_mean(name, valid)}; the installed trl accepts: {valid}"
            for name in names if name not in valid]


def sft_adapter(value: str, path: str) -> list[str]:
    """Field check: a LoRA adapter folder (adapter_config.json), or a hub id."""
    folder = Path(value)
    if folder.is_dir():
        if (folder / "adapter_config.json").is_file():
            return []
        return [f"{path}: {value} holds no adapter_config.json, so it is not a LoRA adapter; a merged (full) SFT "
                "model goes into model_name_or_path instead"]
    if value.count("/") == 1 and not value.startswith((".", "/", "~")):
        return []
    return [f"{path}: no such folder: {value}. It is the final/ folder of a LoRA SFT run; make one with: "
            "uv run python self_model/fine_tuning/train_finetune.py --config config/self_model_config/finetune.yaml"]


@dataclass
class DPODataConfig(ChatDataConfig):
    """`data:` for DPO: preference pairs (a prompt, a chosen and a rejected reply)."""

    # Pairs whose chosen and rejected replies are identical teach nothing: an error, or dropped and counted.
    drop_identical: bool = False


@dataclass
class RewardSection:
    """`ppo.reward:` what scores a reply: rule-based functions, a reward model, or (trl) both, summed."""

    # Built-in (exact_match, normalized_match, format, length_penalty) or your own as path/to/file.py:function, all
    # in verl's signature compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs).
    functions: list[str] = field(default_factory=list, metadata={"check": reward_specs})
    # One weight per function (default 1.0 each); the reward is the weighted sum.
    weights: list[float] | None = None
    # A sequence-classification model scoring prompt + reply (one logit): a local folder or a hub id.
    reward_model_name_or_path: str | None = field(default=None, metadata={"check": local_or_hub})
    # trl: the reward model's weight in the sum.
    reward_model_weight: float = 1.0

    def __post_init__(self) -> None:
        from self_model.core.rewards import reward_name

        if not self.functions and not self.reward_model_name_or_path:
            raise ValueError("name at least one reward: functions: [normalized_match] (built-in: exact_match, "
                             "normalized_match, format, length_penalty, or path/to/file.py:function) and/or "
                             "reward_model_name_or_path")
        if self.weights is not None and len(self.weights) != len(self.functions):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.functions)} functions; give one "
                             "weight per function (or none: 1.0 each)")
        names = [reward_name(spec) for spec in self.functions]
        if len(set(names)) != len(names):
            raise ValueError(f"functions: two rewards share a name ({names}); each is logged under its name")


@dataclass
class PPOSection:
    """`ppo:` PPO and GRPO (train_ppo.py, train_grpo.py); the DPO script does not read it. README: "PPO and GRPO"."""

    # Prompts with a reference answer: {"question", "answer"}, or prompt / messages with ground_truth or answer.
    # Required by train_ppo.py / train_grpo.py (DPO accepts an empty ppo: section).
    train_file: str | list[str] | None = field(default=None, metadata={"check": existing_files})
    eval_file: str | list[str] | None = field(default=None, metadata={"check": existing_files})
    # A system turn put in front of every prompt (e.g. asking for <think>...</think><answer>...</answer>).
    system_prompt: str | None = None
    # Prompt tokens (chat template included) and generated tokens per reply.
    max_prompt_length: int = 512
    max_response_length: int = 512
    # Prompts longer than max_prompt_length: error (counted, first ones listed with file:line) or drop (counted).
    prompt_truncation: Literal["error", "drop"] = "error"
    # Use only the first N training prompts.
    max_samples: int | None = None
    # trl: this machine (CPU or GPUs; GRPO only); verl: a Ray cluster with vLLM / SGLang rollout (PPO and GRPO).
    backend: Literal["trl", "verl"] = "trl"
    # verl: write the run folder (parquet, tokenizer, verl_overrides.txt) and stop, without launching verl.
    prepare_only: bool = False
    # The run folder; {algorithm} becomes ppo or grpo.
    output_dir: str = "self_model/checkpoints/rlhf/{algorithm}"
    # verl's rollout engine (the installed verl's registry: vllm, sglang, trtllm).
    rollout_backend: str = "vllm"
    # Replies sampled per prompt (GRPO: at least 2, 4+ typical; PPO: 1 is usual).
    rollout_n: int = 4
    # Prompts per training step; split into mini-batches of ppo_mini_batch_size prompts, one optimizer step each.
    train_batch_size: int = 8
    ppo_mini_batch_size: int = 4
    # Sequences per GPU (or process) per forward pass; gradients are accumulated up to the mini-batch.
    ppo_micro_batch_size_per_gpu: int = 2
    actor_lr: float = 1.0e-6
    critic_lr: float = 1.0e-5
    # A KL penalty to the reference in the loss; null: on for GRPO, off for PPO.
    use_kl_loss: bool | None = None
    kl_loss_coef: float = 0.001
    # verl trainer.logger (console, wandb, swanlab, tensorboard, ...); null: console plus `trace`.
    logger: list[str] | None = None
    n_gpus_per_node: int = 8
    nnodes: int = 1
    total_epochs: int = 1
    # Stop after this many training steps (each of train_batch_size prompts); null: total_epochs decides.
    total_training_steps: int | None = None
    reward: RewardSection = field(default_factory=lambda: RewardSection(functions=["normalized_match"]))
    # Raw verl overrides for anything not modelled here (key=value, Hydra syntax); they win over generated ones.
    extra_overrides: list[str] = field(default_factory=list, metadata={"check": override_problems})
    # backend trl: any trl GRPOConfig field not set by the keys above (checked against the installed class).
    trl_args: dict[str, Any] = field(default_factory=dict, metadata={"check": grpo_args_problems})

    def __post_init__(self) -> None:
        sizes = {"max_prompt_length": self.max_prompt_length, "max_response_length": self.max_response_length,
                 "rollout_n": self.rollout_n, "train_batch_size": self.train_batch_size,
                 "ppo_mini_batch_size": self.ppo_mini_batch_size, "n_gpus_per_node": self.n_gpus_per_node,
                 "ppo_micro_batch_size_per_gpu": self.ppo_micro_batch_size_per_gpu, "nnodes": self.nnodes,
                 "total_epochs": self.total_epochs, "total_training_steps": self.total_training_steps or 1}
        bad = [f"{k} must be at least 1, got {v}" for k, v in sizes.items() if v < 1]
        bad += [f"{k} must be positive, got {v}" for k, v in (("actor_lr", self.actor_lr),
                                                               ("critic_lr", self.critic_lr)) if v <= 0]
        if self.kl_loss_coef < 0:
            bad.append(f"kl_loss_coef must be 0 or more, got {self.kl_loss_coef}")
        if bad:
            raise ValueError("; ".join(bad))


@dataclass
class RLHFConfig(StageConfig):
    """config/self_model_config/rlhf.yaml"""

    data: DPODataConfig = field(default=None, metadata={"required": True})  # type: ignore[assignment]
    # A LoRA SFT result to start from; the DPO reference is then the SFT model, never the raw base.
    adapter_name_or_path: str | None = field(default=None, metadata={"check": sft_adapter})
    # How far the policy may move from the reference (higher: closer); trl's DPOConfig.beta.
    beta: float = 0.1
    # One of the installed trl's DPO losses, or a list of them (weights in training_args.loss_weights).
    loss_type: str | list[str] = field(default="sigmoid", metadata={"check": check_loss_type})
    ppo: PPOSection | None = None
    # Passed to trl's DPOConfig and checked against its fields.
    training_args: dict[str, Any] = field(default_factory=dict, metadata={"check": check_dpo_args})

    @property
    def tokenizer_path(self) -> str:
        """tokenizer_name_or_path, else the SFT adapter folder when it holds a tokenizer, else the model's."""
        if self.tokenizer_name_or_path:
            return self.tokenizer_name_or_path
        if self.adapter_name_or_path and (Path(self.adapter_name_or_path) / "tokenizer_config.json").is_file():
            return self.adapter_name_or_path
        return self.model_name_or_path

    def validate(self) -> list[str]:
        errors = self.validate_paths()
        if self.beta <= 0:
            errors.append(f"beta: expected a positive number, got {self.beta}")
        return errors


@dataclass
class PPOStageConfig(RLHFConfig):
    """rlhf.yaml as train_ppo.py reads it: the `ppo:` section is required, DPO's `data:` is not read."""

    algorithm: ClassVar[str] = "ppo"
    data: DPODataConfig | None = None  # type: ignore[assignment]
    ppo: PPOSection = field(default=None, metadata={"required": True})  # type: ignore[assignment]

    @property
    def output_dir(self) -> str:
        return self.ppo.output_dir.replace("{algorithm}", self.algorithm)

    def validate(self) -> list[str]:
        from self_model.core.rl_checks import ppo_problems

        return self.validate_paths() + ppo_problems(self, self.algorithm)


@dataclass
class GRPOStageConfig(PPOStageConfig):
    """rlhf.yaml as train_grpo.py reads it."""

    algorithm: ClassVar[str] = "grpo"
