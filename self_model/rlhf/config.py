"""The schema of config/self_model_config/rlhf.yaml, the one file the three RLHF scripts share.

    keys every script reads     model_name_or_path, adapter_name_or_path, tokenizer / template, peft, trace
    train_dpo.py reads          data:, beta, loss_type, training_args: (trl's DPOConfig)
    train_ppo.py / train_grpo.py read   ppo: (with ppo.output_dir, ppo.actor_lr, ppo.trl_args)

Each script validates the whole file, so a typo anywhere is reported whichever script runs first, and each
script says at start which sections it does not read (they belong to the other scripts). `DPOStageConfig` and
`RLStageConfig` are siblings over `AlignmentConfig`; neither inherits the other's keys.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from self_model.core.config import existing_files
from self_model.core.dataset_mix import DatasetRef, Mix
from self_model.core.lineage import is_adapter, result_folder
from self_model.core.stage_config import (
    ChatDataConfig,
    StageConfig,
    adapter_folder,
    check_data_source,
    local_or_hub,
    wrapped_init_problem,
)
from self_model.rlhf.ppo_grpo.checks import grpo_args_problems, override_problems, reward_specs

logger = logging.getLogger("self_model")


def sft_adapter(value: str, path: str) -> list[str]:
    """Field check: a LoRA adapter folder (adapter_config.json; a run folder means its final/), or a hub id."""
    problems = adapter_folder(value, path)
    if problems and "no such folder" in problems[0]:
        return [f"{path}: no such folder: {value}. It is the final/ folder of a LoRA SFT run; make one with: uv run "
                "python self_model/fine_tuning/train_finetune.py --config config/self_model_config/finetune.yaml"]
    return problems


TRAIN_REWARD = "uv run python self_model/rlhf/train_reward.py --config config/self_model_config/reward.yaml"


def reward_model_folder(value: str, path: str) -> list[str]:
    """Field check: a sequence-classification model with one score (a train_reward.py result, its run folder, or a
    hub id). A causal LM folder would load too, with a new random score head: every reply scored by noise."""
    problems = local_or_hub(value, path)
    folder = Path(result_folder(value))
    if problems or not folder.is_dir():
        return problems
    fix = f"train a reward model with: {TRAIN_REWARD}, and name its final/ (or its run folder) here"
    if is_adapter(folder):
        task = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("task_type")
        return [f"{path}: {value} is a LoRA adapter (task_type {task}), not a reward model with full weights; "
                f"train_reward.py saves a LoRA reward model merged into full weights; {fix}"]
    config_file = folder / "config.json"
    if not config_file.is_file():
        return [f"{path}: {folder} holds no config.json, so it is no model; {fix}"]
    config = json.loads(config_file.read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        return [f"{path}: {value} is not a sequence-classification reward model: its config.json names "
                f"{architectures or 'no architecture'} (a language model, e.g. an SFT or DPO result), which would be "
                f"scored by a new, random head; {fix}"]
    labels = len(config.get("id2label") or {}) or 2  # transformers leaves id2label out for its default, 2 labels
    if labels != 1:
        return [f"{path}: {value} is a classifier with {labels} labels; a reward model gives one score ({fix})"]
    return []


@dataclass
class AlignmentConfig(StageConfig):
    """rlhf.yaml's shared keys: the stage keys, with the SFT result to start from.

    The start (model_name_or_path / adapter_name_or_path / start_adapter) works as in every stage (core.lineage):
    model_name_or_path may be the SFT run's final/ itself, adapter or full weights. With an SFT adapter, LoRA
    continues it (stacked: the reference is the SFT model) unless start_adapter: merge, which merges it and trains a
    new LoRA whose switched-off state, the merged SFT model, is the reference.
    """

    # A LoRA SFT result to start from; the reference is then the SFT model, never the raw base.
    adapter_name_or_path: str | None = field(default=None, metadata={"check": sft_adapter})
    # The original guide's top-level spelling of ppo.reward.reward_model_name_or_path (PPO / GRPO use it as that).
    reward_model_name_or_path: str | None = field(default=None, metadata={"check": reward_model_folder})


# ---- DPO: data:, beta, loss_type, training_args ------------------------------------------------------------------
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


@dataclass
class DPODataConfig(ChatDataConfig):
    """`data:` for DPO: preference pairs (a prompt, a chosen and a rejected reply)."""

    # Pairs whose chosen and rejected replies are identical teach nothing: an error, or dropped and counted.
    drop_identical: bool = False


# ---- PPO / GRPO: ppo: ---------------------------------------------------------------------------------------------
@dataclass
class RewardSection:
    """`ppo.reward:` what scores a reply: rule-based functions, a reward model, or (trl) both, summed."""

    # Built-in (exact_match, normalized_match, format, length_penalty) or your own as path/to/file.py:function, all
    # in verl's signature compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs).
    functions: list[str] = field(default_factory=list, metadata={"check": reward_specs})
    # One weight per function (default 1.0 each); the reward is the weighted sum.
    weights: list[float] | None = None
    # A sequence-classification model scoring prompt + reply (one logit): a train_reward.py result (its final/ or
    # run folder) or a hub id. Its tokenizer's chat_template renders prompt + reply (train_reward.py saves ours).
    reward_model_name_or_path: str | None = field(default=None, metadata={"check": reward_model_folder})
    # trl: the reward model's weight in the sum.
    reward_model_weight: float = 1.0

    def __post_init__(self) -> None:
        from self_model.rlhf.ppo_grpo.rewards import reward_name

        if self.weights is not None and len(self.weights) != len(self.functions):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.functions)} functions; give one "
                             "weight per function (or none: 1.0 each)")
        names = [reward_name(spec) for spec in self.functions]
        if len(set(names)) != len(names):
            raise ValueError(f"functions: two rewards share a name ({names}); each is logged under its name")


@dataclass
class RLSection:
    """`ppo:` online RL, PPO and GRPO (train_ppo.py, train_grpo.py); README: "PPO and GRPO".

    The section keeps the name `ppo:` users know from the original guide; it configures GRPO too.
    """

    # Prompts with a reference answer: {"question", "answer"}, or prompt / messages with ground_truth or answer.
    # Required by train_ppo.py / train_grpo.py (DPO accepts an empty ppo: section).
    train_file: str | list[str] | None = field(default=None, metadata={"check": existing_files})
    eval_file: str | list[str] | None = field(default=None, metadata={"check": existing_files})
    # Or data sets by name (dataset_registry) with weights / caps, mixed by `mix`, seeded from trl_args.seed
    # (README "Datasets by name and mixing").
    datasets: list[DatasetRef] | None = None
    mix: Mix = "concat"
    dataset_registry: str = "config/datasets.yaml"
    mix_seed: int = field(default=42, init=False)
    # A system turn put in front of every prompt (e.g. asking for <think>...</think><answer>...</answer>).
    system_prompt: str | None = None
    # Prompt tokens (chat template included) and generated tokens per reply.
    max_prompt_length: int = 512
    max_response_length: int = 512
    # Prompts longer than max_prompt_length: error (counted, first ones listed with file:line) or drop (counted).
    prompt_truncation: Literal["error", "drop"] = "error"
    # Use only the first N training prompts.
    max_samples: int | None = None
    # trl: this machine (CPU or GPUs; GRPO only); verl: a Ray cluster with vLLM / SGLang rollout (PPO and GRPO);
    # auto: GRPO on trl, PPO on verl (trl has no PPO trainer).
    backend: Literal["auto", "trl", "verl"] = "auto"
    # verl: write the run folder (parquet, tokenizer, verl_overrides.txt) and stop, without launching verl.
    prepare_only: bool = False
    # The run folder; {algorithm} becomes ppo or grpo.
    output_dir: str = "self_model/checkpoints/rlhf/{algorithm}"
    # What generates the replies. verl: one of its rollout engines (vllm, sglang, trtllm); trl: hf (transformers
    # generate) or vllm (trl's use_vllm, needs a GPU). null: vllm on verl, hf on trl.
    rollout_backend: str | None = None
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
        check_data_source(self, "ppo")  # train_file or datasets (PPO / GRPO need one: checks.ppo_problems)
        if bad:
            raise ValueError("; ".join(bad))


# ---- what each script reads ------------------------------------------------------------------------------------
@dataclass
class DPOStageConfig(AlignmentConfig):
    """rlhf.yaml as train_dpo.py reads it. `ppo:` is validated (it shares the file) but not read."""

    data: DPODataConfig = field(default=None, metadata={"required": True})  # type: ignore[assignment]
    # How far the policy may move from the reference (higher: closer); trl's DPOConfig.beta.
    beta: float = 0.1
    # One of the installed trl's DPO losses, or a list of them (weights in training_args.loss_weights).
    loss_type: str | list[str] = field(default="sigmoid", metadata={"check": check_loss_type})
    # train_ppo.py / train_grpo.py's section.
    ppo: RLSection | None = None
    # Passed to trl's DPOConfig and checked against its fields; training_args.output_dir is DPO's run folder.
    training_args: dict[str, Any] = field(default_factory=dict, metadata={"check": check_dpo_args})

    not_read: ClassVar[tuple[str, ...]] = ("ppo", "reward_model_name_or_path")

    def validate(self) -> list[str]:
        errors = self.validate_paths() + [p for p in [wrapped_init_problem(self.peft)] if p]
        if self.beta <= 0:
            errors.append(f"beta: expected a positive number, got {self.beta}")
        return errors


@dataclass
class RLStageConfig(AlignmentConfig):
    """rlhf.yaml as train_ppo.py / train_grpo.py read it: `ppo:` is required; DPO's keys are validated, not read."""

    algorithm: ClassVar[str] = ""
    ppo: RLSection = field(default=None, metadata={"required": True})  # type: ignore[assignment]
    # train_dpo.py's keys in the shared file. This stage writes to ppo.output_dir and learns at ppo.actor_lr.
    data: DPODataConfig | None = None
    beta: float = 0.1
    loss_type: str | list[str] = field(default="sigmoid", metadata={"check": check_loss_type})
    training_args: dict[str, Any] = field(default_factory=dict, metadata={"check": check_dpo_args})

    not_read: ClassVar[tuple[str, ...]] = ("data", "beta", "loss_type", "training_args")

    def __post_init__(self) -> None:
        ppo = self.ppo
        if ppo.backend == "auto":
            ppo.backend = "verl" if self.algorithm == "ppo" else "trl"
            logger.info("ppo.backend: auto -> %s for %s", ppo.backend, self.algorithm.upper())
        if ppo.rollout_backend is None:
            ppo.rollout_backend = "vllm" if ppo.backend == "verl" else "hf"
        if self.reward_model_name_or_path:
            if ppo.reward.reward_model_name_or_path not in (None, self.reward_model_name_or_path):
                raise ValueError("reward_model_name_or_path (top level, the original guide's key) and "
                                 "ppo.reward.reward_model_name_or_path name different models; keep one")
            logger.warning("reward_model_name_or_path at the top level is the original guide's spelling; it is used "
                           "as ppo.reward.reward_model_name_or_path (write it there)")
            ppo.reward.reward_model_name_or_path = self.reward_model_name_or_path

    @property
    def output_dir(self) -> str:
        return self.ppo.output_dir.replace("{algorithm}", self.algorithm)

    def validate(self) -> list[str]:
        from self_model.rlhf.ppo_grpo.checks import ppo_problems

        return (self.validate_paths() + [p for p in [wrapped_init_problem(self.peft)] if p]
                + ppo_problems(self, self.algorithm))


@dataclass
class PPOStageConfig(RLStageConfig):
    """rlhf.yaml as train_ppo.py reads it."""

    algorithm: ClassVar[str] = "ppo"


@dataclass
class GRPOStageConfig(RLStageConfig):
    """rlhf.yaml as train_grpo.py reads it."""

    algorithm: ClassVar[str] = "grpo"


def log_unread_sections(cfg: AlignmentConfig, script: str, where: str) -> None:
    """Say which keys of the shared file this script leaves to the others, and where its own results go."""
    present = [name for name in type(cfg).not_read if getattr(cfg, name, None) not in (None, {}, [])]
    if present:
        logger.info("%s reads its own keys of rlhf.yaml (%s); %s belong to the other RLHF scripts and are only "
                    "validated here", script, where, ", ".join(present))
