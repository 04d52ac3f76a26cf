"""Checks of the `ppo:` section that need the algorithm, the backend or the installed verl / trl.

Batch sizes follow verl's rules (explained in each message) so that a config that verl would reject fails here,
on any machine, before a GPU is booked; the verl tests compose verl's own config and run its validation too.
Choices that verl only knows in code (rollout engines, loggers) are read from the installed verl's source, without
importing it (importing verl takes ~20 s).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

from self_model.core.config import did_you_mean

GRPO_CONFIG = "trl.trainer.grpo_config:GRPOConfig"
# GRPOConfig fields that ppo.* keys set, and what sets them.
GRPO_RESERVED_ARGS = {
    "output_dir": "ppo.output_dir",
    "learning_rate": "ppo.actor_lr",
    "num_generations": "ppo.rollout_n",
    "max_completion_length": "ppo.max_response_length",
    "beta": "ppo.kl_loss_coef (and ppo.use_kl_loss)",
    "per_device_train_batch_size": "ppo.ppo_micro_batch_size_per_gpu",
    "gradient_accumulation_steps": "ppo.ppo_mini_batch_size (x rollout_n / micro batch / processes)",
    "generation_batch_size": "ppo.train_batch_size",
    "steps_per_generation": "ppo.train_batch_size",
    "num_train_epochs": "ppo.total_epochs",
    "max_steps": "ppo.total_training_steps",
    "reward_weights": "ppo.reward.weights",
    "use_vllm": "ppo.rollout_backend (hf or vllm)",
    "trust_remote_code": "the top-level trust_remote_code:",
    "model_init_kwargs": "model_name_or_path / peft.qlora (this toolkit loads the model)",
}
# What the installed verl 0.9.1 offers, for machines without verl (the rlhf extra).
VERL_ROLLOUTS_FALLBACK = ["vllm", "sglang", "trtllm"]
VERL_LOGGERS_FALLBACK = ["wandb", "mlflow", "swanlab", "vemlp_wandb", "tensorboard", "console", "clearml", "trackio",
                         "file", "rl_insight"]
_OVERRIDE = re.compile(r"^[+~]{0,2}[A-Za-z_][\w.@/-]*=")


def _verl_source(relative: str) -> ast.Module | None:
    found = importlib.util.find_spec("verl")
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / relative
    return ast.parse(path.read_text(encoding="utf-8")) if path.is_file() else None


@cache
def verl_rollout_backends() -> list[str]:
    """Names registered with verl's RolloutReplicaRegistry (`rollout.name`)."""
    tree = _verl_source("workers/rollout/replica.py")
    if tree is None:
        return VERL_ROLLOUTS_FALLBACK
    names = [node.args[0].value for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "register"
             and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)]
    return names or VERL_ROLLOUTS_FALLBACK


@cache
def verl_loggers() -> list[str]:
    """verl's Tracking.supported_backend (`trainer.logger`)."""
    tree = _verl_source("utils/tracking.py")
    for node in ast.walk(tree) if tree is not None else []:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "supported_backend"
                                                for t in node.targets) and isinstance(node.value, ast.List):
            return [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
    return VERL_LOGGERS_FALLBACK


def reward_specs(value: list[str], path: str) -> list[str]:
    """Field check: built-in reward names, or path/to/file.py:function (imported later, by the PPO / GRPO scripts)."""
    from self_model.rlhf.ppo_grpo.rewards import spec_problem

    return [f"{path}[{i}]: {problem}" for i, spec in enumerate(value) if (problem := spec_problem(spec))]


def override_problems(value: list[str], path: str) -> list[str]:
    return [f"{path}[{i}]: {item!r} is not a Hydra override (key=value, +key=value to add a key verl's config "
            "lacks, e.g. trainer.save_freq=20)" for i, item in enumerate(value) if not _OVERRIDE.match(item)]


def grpo_args_problems(args: dict[str, Any], path: str) -> list[str]:
    from self_model.core.backend_args import RENAMED_ARGS, RESERVED_ARGS, check_backend_args

    return check_backend_args(args, GRPO_CONFIG, path, RENAMED_ARGS, {**RESERVED_ARGS, **GRPO_RESERVED_ARGS})


def kl_enabled(ppo: Any, algorithm: str) -> bool:
    """use_kl_loss, defaulting to on for GRPO (its loss has the KL term) and off for PPO (the critic's baseline)."""
    return ppo.use_kl_loss if ppo.use_kl_loss is not None else algorithm == "grpo"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# ---- batch sizes --------------------------------------------------------------------------------------------
def verl_batch_problems(ppo: Any) -> list[str]:
    """verl's rules for train / mini / micro batches over n_gpus_per_node x nnodes GPUs (data parallel)."""
    gpus, n = ppo.n_gpus_per_node * ppo.nnodes, ppo.rollout_n
    train, mini, micro = ppo.train_batch_size, ppo.ppo_mini_batch_size, ppo.ppo_micro_batch_size_per_gpu
    errors = []
    if train * n % gpus:
        errors.append(f"ppo.train_batch_size x rollout_n = {train} x {n} = {train * n} replies per step must be "
                      f"divisible by the {gpus} GPUs (n_gpus_per_node x nnodes) so each gets the same number "
                      "(verl: real_train_batch_size % n_gpus == 0)")
    if train < mini:
        errors.append(f"ppo.ppo_mini_batch_size ({mini}) must be at most train_batch_size ({train}): a step's prompts "
                      "are split into mini-batches, one optimizer step each")
    elif mini * n % gpus:
        errors.append(f"ppo.ppo_mini_batch_size x rollout_n = {mini} x {n} = {mini * n} replies per optimizer step "
                      f"must be divisible by the {gpus} GPUs: each mini-batch is split evenly across them")
    elif mini * n // gpus % micro:
        errors.append(f"each GPU's share of a mini-batch ({mini} x {n} / {gpus} = {mini * n // gpus} replies) must be "
                      f"a whole number of micro-batches of ppo_micro_batch_size_per_gpu = {micro}")
    return errors


def trl_batch_problems(ppo: Any, processes: int) -> list[str]:
    """The same batch sizes as trl's GRPOConfig takes them: completions per device per forward = micro batch."""
    n, train, mini = ppo.rollout_n, ppo.train_batch_size, ppo.ppo_mini_batch_size
    per_forward = ppo.ppo_micro_batch_size_per_gpu * processes
    errors = []
    if train < mini or train % mini:
        errors.append(f"ppo.train_batch_size ({train}) must be a multiple of ppo_mini_batch_size ({mini}) with trl: "
                      "each generation round is used for a whole number of optimizer steps")
    for name, prompts in (("ppo_mini_batch_size", mini), ("train_batch_size", train)):
        if prompts * n % per_forward:
            errors.append(f"ppo.{name} x rollout_n = {prompts} x {n} = {prompts * n} replies must be a whole number "
                          f"of forward passes of ppo_micro_batch_size_per_gpu x processes = {per_forward} (trl: "
                          "gradient_accumulation_steps and steps_per_generation are whole numbers)")
    return errors


# ---- the whole section ----------------------------------------------------------------------------------------
def ppo_problems(cfg: Any, algorithm: str) -> list[str]:
    """Every problem of the config for `algorithm` (ppo / grpo) on its backend, at once."""
    ppo = cfg.ppo
    errors = []
    if not ppo.train_file and not ppo.datasets:
        errors.append("ppo.train_file: required key is missing (prompts with a reference answer, e.g. "
                      "data_process/sample_data/grpo_train.jsonl)")
    if algorithm == "grpo" and ppo.rollout_n < 2:
        errors.append(f"ppo.rollout_n: GRPO needs at least 2 replies per prompt (got {ppo.rollout_n}): each reply's "
                      "advantage is its reward minus the mean of its group; 4 or more is typical")
    if algorithm == "ppo" and ppo.backend == "trl":
        errors.append(ppo_trl_problem())
    errors += verl_problems(cfg, algorithm) if ppo.backend == "verl" else trl_batch_problems(ppo, world_size())
    if ppo.backend == "trl":
        errors += trl_rollout_problems(ppo)
    if ppo.prepare_only and ppo.backend != "verl":
        errors.append("ppo.prepare_only: only means something for ppo.backend: verl (write the run folder, launch "
                      "nothing); backend trl trains on this machine")
    if not ppo.reward.functions and not ppo.reward.reward_model_name_or_path:
        # Checked here, not in the section: the guide's top-level reward_model_name_or_path fills it in first.
        errors.append("ppo.reward: name at least one reward: functions: [normalized_match] (built-in: exact_match, "
                      "normalized_match, format, length_penalty, or path/to/file.py:function) and/or "
                      "reward_model_name_or_path")
    errors += reward_import_problems(ppo.reward.functions)
    if not ppo.output_dir.strip():
        errors.append("ppo.output_dir: empty")
    return errors


def trl_rollout_problems(ppo: Any) -> list[str]:
    """trl generates with transformers (hf) or, with use_vllm, with vLLM on a GPU."""
    if ppo.rollout_backend == "hf":
        return []
    if ppo.rollout_backend != "vllm":
        return [f"ppo.rollout_backend: '{ppo.rollout_backend}' is not a rollout of backend trl; choose hf "
                "(transformers generate, any machine) or vllm (trl's use_vllm, a GPU with vLLM installed)"]
    import torch

    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        return ["ppo.rollout_backend: vllm with backend trl needs vLLM and a GPU here (uv sync --extra vllm); use "
                "rollout_backend: hf (transformers generate) on this machine"]
    return []


def ppo_trl_problem() -> str:
    import trl

    shipped = importlib.util.find_spec("trl.experimental.ppo") is not None
    where = (f"trl {trl.__version__} still ships trl.experimental.ppo, but this toolkit runs PPO with verl only"
             if shipped else f"trl {trl.__version__} has no PPO trainer (it was last in trl.experimental.ppo of "
             "trl 1.12)")
    return (f"ppo.backend: trl cannot run PPO: {where}. Set ppo.backend: verl (uv sync --extra rlhf; a GPU cluster, "
            "or ppo.prepare_only: true to write the run folder here), or run GRPO on this machine: "
            "self_model/rlhf/train_grpo.py")


def verl_problems(cfg: Any, algorithm: str) -> list[str]:
    ppo = cfg.ppo
    errors = verl_batch_problems(ppo)
    rollouts = verl_rollout_backends()
    if ppo.rollout_backend not in rollouts:
        hint = (" (verl has no plain transformers rollout; backend: trl generates with transformers on this "
                "machine)" if ppo.rollout_backend == "hf" else did_you_mean(ppo.rollout_backend, rollouts))
        errors.append(f"ppo.rollout_backend: '{ppo.rollout_backend}' is not a rollout engine of the installed verl"
                      f"{hint}; choose one of {rollouts}")
    loggers = verl_loggers()
    errors += [f"ppo.logger: '{name}' is not a verl logger{did_you_mean(name, loggers)}; choose from {loggers}"
               for name in ppo.logger or [] if name not in loggers]
    if cfg.adapter_name_or_path and not cfg.peft.enabled:
        errors.append("adapter_name_or_path with peft.enabled: false: verl cannot merge an adapter. Keep "
                      "peft.enabled: true to continue training the adapter, or merge it into the base model "
                      "(peft's merge_and_unload + save_pretrained) and point model_name_or_path at the result")
    if cfg.peft.qlora:
        errors.append("peft.qlora: verl trains LoRA on 16-bit weights, not 4-bit QLoRA; set peft.qlora: false")
    if ppo.reward.functions and ppo.reward.reward_model_name_or_path:
        errors.append("ppo.reward: verl 0.9 scores with the reward functions whenever they are set and then ignores "
                      "the reward model; give either functions or reward_model_name_or_path for backend: verl")
    return errors


def reward_import_problems(specs: list[str]) -> list[str]:
    """Import each path:function reward now and check its signature (built-ins need nothing)."""
    from self_model.rlhf.ppo_grpo.rewards import load_reward, split_spec

    errors = []
    for i, spec in enumerate(specs):
        if split_spec(spec) is not None:
            try:
                load_reward(spec)
            except ValueError as exc:
                errors.append(f"ppo.reward.functions[{i}]: {exc}")
    return errors
