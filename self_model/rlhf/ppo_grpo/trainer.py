"""GRPO with trl on one machine (CPU or GPUs): trl's GRPOConfig from the `ppo:` keys, rewards, the trainer.

Batch sizes mean what they mean in verl: `train_batch_size` prompts per step (one generation round of
`rollout_n` replies each), split into mini-batches of `ppo_mini_batch_size` prompts (one optimizer step each),
computed `ppo_micro_batch_size_per_gpu` sequences at a time. In trl's terms, per process:
    per_device_train_batch_size = micro
    gradient_accumulation_steps = mini x rollout_n / (micro x processes)
    steps_per_generation        = train x rollout_n / (micro x processes)
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch

from self_model.core.backend_args import RUN_DEFAULTS
from self_model.core.errors import ConfigError, UserError
from self_model.core.lineage import result_folder, start_of
from self_model.core.modeling import weights_dtype
from self_model.core.run import MetricsMixin, build_training_args
from self_model.core.tracking import setup_tracking
from self_model.rlhf import policy as rlhf_model
from self_model.rlhf.config import RLStageConfig
from self_model.rlhf.ppo_grpo.checks import kl_enabled, world_size
from self_model.rlhf.ppo_grpo.rewards import reward_name, trl_reward_funcs
from self_model.template.resolve import Template

logger = logging.getLogger("self_model")

# Defaults that differ from trl's GRPOConfig; any of them can be set in ppo.trl_args.
GRPO_DEFAULTS: dict[str, Any] = {
    **RUN_DEFAULTS,
    "logging_steps": 1,  # a GRPO step is a whole round of generation: each one is worth a line
    "save_total_limit": 2,
    "lr_scheduler_type": "constant",
    "include_num_input_tokens_seen": "no",  # trl's GRPO batches hold prompts, not the input_ids it would count
    # trl turns both on; as for SFT and DPO, precision is asked for explicitly and checkpointing is opt-in.
    "bf16": False,
    "gradient_checkpointing": False,
}
GRPO_METRICS = ("reward", "reward_std", "kl", "completions/mean_length", "completions/clipped_ratio", "entropy")


def grpo_training_args(cfg: RLStageConfig) -> Any:
    from trl import GRPOConfig

    ppo, processes = cfg.ppo, world_size()
    micro, n = ppo.ppo_micro_batch_size_per_gpu, ppo.rollout_n
    run_name = os.path.basename(os.path.normpath(cfg.output_dir))
    defaults = dict(GRPO_DEFAULTS, run_name=run_name)
    if ppo.eval_file:
        # Each eval batch must hold whole groups of rollout_n replies; score the policy before training too.
        defaults.update(eval_strategy="steps", eval_steps=GRPO_DEFAULTS["save_steps"], eval_on_start=True,
                        per_device_eval_batch_size=n)
    weights = list(ppo.reward.weights or [1.0] * len(ppo.reward.functions))
    if ppo.reward.reward_model_name_or_path:
        weights.append(ppo.reward.reward_model_weight)
    values = dict(ppo.trl_args, output_dir=cfg.output_dir, learning_rate=ppo.actor_lr, num_generations=n,
                  max_completion_length=ppo.max_response_length,
                  beta=ppo.kl_loss_coef if kl_enabled(ppo, "grpo") else 0.0,
                  per_device_train_batch_size=micro,
                  gradient_accumulation_steps=ppo.ppo_mini_batch_size * n // (micro * processes),
                  steps_per_generation=ppo.train_batch_size * n // (micro * processes),
                  num_train_epochs=ppo.total_epochs, reward_weights=weights, trust_remote_code=cfg.trust_remote_code,
                  use_vllm=ppo.rollout_backend == "vllm")
    if ppo.total_training_steps:  # a verl step (train_batch_size prompts) is train / mini optimizer steps
        values["max_steps"] = ppo.total_training_steps * math.ceil(ppo.train_batch_size / ppo.ppo_mini_batch_size)
    return build_training_args(values, GRPOConfig, defaults)


def load_reward_model(cfg: RLStageConfig, tokenizer: Any) -> tuple[Any, Any]:
    """The reward model (sequence classification, one score) and its tokenizer, for trl to score prompt + reply."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = result_folder(cfg.ppo.reward.reward_model_name_or_path)  # a train_reward.py run folder: its final/
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32,
                                                                   trust_remote_code=cfg.trust_remote_code)
        rm_tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"ppo.reward.reward_model_name_or_path: cannot load a sequence-classification model with "
                        f"its tokenizer from '{path}': {str(exc)[:400]}") from None
    if rm_tokenizer.pad_token is None:
        rm_tokenizer.pad_token = rm_tokenizer.eos_token
    model.config.pad_token_id = rm_tokenizer.pad_token_id
    if not getattr(rm_tokenizer, "chat_template", None):
        rm_tokenizer.chat_template = tokenizer.chat_template
        logger.warning("the reward model's tokenizer has no chat_template; it scores prompt + reply rendered with the "
                       "policy's template")
    return model.eval().requires_grad_(False), rm_tokenizer


def build_grpo_trainer(cfg: RLStageConfig, tokenizer: Any, template: Template, args: Any, train: Any,
                       eval_: Any) -> tuple[Any, str]:
    """trl's GRPOTrainer with the policy (from the SFT result), the rewards and the right reference."""
    from trl import GRPOTrainer

    class GRPORunTrainer(MetricsMixin, GRPOTrainer):
        log_perplexity = False

    template.apply_to_tokenizer(tokenizer)  # trl renders the prompts with the tokenizer's chat_template
    kl = args.beta != 0.0
    dtype = weights_dtype(args, cfg.peft)
    # trl builds a full-training reference from the weights on disk: a merged start needs its own frozen copy.
    merged_start = bool(start_of(cfg).merged)
    models = rlhf_model.load_policy(cfg, tokenizer, dtype, args.gradient_checkpointing, "GRPO",
                                    reference_copy=kl and merged_start and not cfg.peft.enabled)
    reference = models.reference if kl else "none: use_kl_loss is off, so no reference model is used"
    stop = template.stop_token_ids(tokenizer)
    if stop:  # generation ends on the template's end-of-turn token, which the model was trained to emit
        models.model.generation_config.eos_token_id = sorted({*stop, tokenizer.eos_token_id} - {None})
    reward_funcs: list[Any] = trl_reward_funcs(cfg.ppo.reward.functions)
    processing = [None] * len(reward_funcs)
    if cfg.ppo.reward.reward_model_name_or_path:
        rm, rm_tokenizer = load_reward_model(cfg, tokenizer)
        reward_funcs.append(rm)
        processing.append(rm_tokenizer)
    args.report_to, callbacks = setup_tracking(cfg.trace, args.output_dir, args.run_name)
    try:
        trainer = GRPORunTrainer(model=models.model, reward_funcs=reward_funcs, args=args, train_dataset=train,
                                 eval_dataset=eval_, processing_class=tokenizer, peft_config=models.peft_config,
                                 reward_processing_classes=processing, callbacks=callbacks)
    except (ValueError, NotImplementedError, TypeError) as exc:
        raise ConfigError([f"trl's GRPOTrainer rejected these settings: {exc}"]) from None
    if kl:
        rlhf_model.check_reference_adapter(cfg, trainer.model)
    if models.ref_model is not None:
        use_sft_reference(trainer, models.ref_model, args)
    logger.info("reference model: %s", reference)
    return trainer, reference


def use_sft_reference(trainer: Any, ref_model: Any, args: Any) -> None:
    """trl builds a full-training reference from the model's path, i.e. the raw base; with a merged SFT adapter the
    reference must be the SFT model, so the frozen copy replaces it, patched and prepared the way trl does its own."""
    from trl.models import prepare_deepspeed, prepare_fsdp
    from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

    if args.disable_dropout:
        disable_dropout_in_model(ref_model)
    add_fused_lm_head(ref_model, temperature=trainer.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
    if trainer.is_deepspeed_enabled:
        trainer.ref_model = prepare_deepspeed(ref_model, trainer.accelerator)
    elif trainer.is_fsdp_enabled:
        trainer.ref_model = prepare_fsdp(ref_model, trainer.accelerator)
    else:
        trainer.ref_model = trainer.accelerator.prepare_model(ref_model, evaluation_mode=True)


def reward_names(cfg: RLStageConfig) -> list[str]:
    names = [reward_name(s) for s in cfg.ppo.reward.functions]
    return names + ([cfg.ppo.reward.reward_model_name_or_path] if cfg.ppo.reward.reward_model_name_or_path else [])


def metrics(trainer: Any, prefix: str = "", which: int = -1) -> dict[str, float]:
    """GRPO metrics of one logged entry (`which`: -1 the last, 0 the first), training or eval (`prefix='eval_'`)."""
    entries = [e for e in trainer.state.log_history if f"{prefix}reward" in e]
    if not entries:
        return {}
    entry = entries[which]
    keys = [f"{prefix}{k}" for k in GRPO_METRICS] + [k for k in entry if k.startswith(f"{prefix}rewards/")]
    return {k: entry[k] for k in keys if isinstance(entry.get(k), (int, float))}


def print_grpo_plan(cfg: RLStageConfig, args: Any, rows: list[dict[str, Any]], report: dict[str, Any],
                    tokenizer: Any, template: Template) -> None:
    """--dry-run: model, reference, rewards, batch arithmetic, data, and one rendered prompt."""
    from self_model.rlhf.policy import describe_reference

    ppo, processes = cfg.ppo, world_size()
    mode = "QLoRA" if cfg.peft.qlora else ("LoRA" if cfg.peft.enabled else "full")
    print("\n=== dry run: nothing is trained ===")
    print(f"model:      {start_of(cfg).describe()} ({mode} GRPO with trl)")
    print(f"reference:  {describe_reference(cfg, 'GRPO') if args.beta else 'none (use_kl_loss off)'}; "
          f"KL coefficient {args.beta}")
    weights = args.reward_weights or []
    print("rewards:    " + " + ".join(f"{w} x {name}" for w, name in zip(weights, reward_names(cfg))))
    print(f"batch:      {ppo.train_batch_size} prompts x {ppo.rollout_n} replies per step; optimizer step every "
          f"{ppo.ppo_mini_batch_size} prompts = {args.per_device_train_batch_size} per forward x "
          f"{args.gradient_accumulation_steps} accumulation x {processes} process(es); a generation round every "
          f"{args.steps_per_generation} forward passes")
    print(f"replies:    up to {ppo.max_response_length} tokens; learning rate {args.learning_rate}")
    print(f"train data: {report['train']['rows_in']} rows -> {report['train']['prompts_out']} prompts; over "
          f"max_prompt_length {ppo.max_prompt_length}: {report['train']['dropped_too_long']} dropped; prompt tokens "
          f"{report['train']['prompt_tokens']}")
    if "eval" in report:
        print(f"eval data:  {report['eval']['prompts_out']} prompts (scored before and after training)")
    print(f"output:     {args.output_dir}")
    rendered = template.prompt_text(tokenizer, rows[0]["messages"])
    print(f"\n--- one prompt ({rows[0]['source']}), ground truth {rows[0]['ground_truth']!r} ---\n{rendered}")


def grpo_results(trainer: Any, result: dict[str, Any]) -> dict[str, Any]:
    """After training: the last metrics, the eval prompts scored once more (before vs after), the reference adapter
    dropped so that final/ holds the trained policy only; the report is written into final/."""
    result["train"] = metrics(trainer)
    if trainer.eval_dataset is not None:
        step = trainer.state.global_step
        if not any("eval_reward" in e and e.get("step") == step for e in trainer.state.log_history):
            trainer.evaluate()
        result.update(eval_before=metrics(trainer, "eval_", 0), eval_after=metrics(trainer, "eval_", -1))
    rlhf_model.drop_reference_adapter(trainer.accelerator.unwrap_model(trainer.model))
    return {"data_report.json": result}
