"""The DPO stage's building blocks: trl's DPOConfig from the YAML, the policy and its reference, the trainer.

The reference model, by case:
- LoRA from a base model: the base itself, by switching the adapter off (trl does this; no second copy).
- LoRA / QLoRA from an SFT adapter (`model_name_or_path` at the SFT run, or `adapter_name_or_path`; start_adapter:
  continue), *stacked*: DPO keeps training the SFT adapter,
  and trl keeps a frozen copy of it as adapter "ref", so the reference is base + SFT adapter = the SFT model.
- Full training: a separate frozen copy of the starting model, or none with `precompute_ref_log_probs`
  (trl then scores the data once before training). From an SFT adapter, the adapter is *merged* into the
  base weights first, so the starting model and the reference are the SFT model.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from self_model.core.backend_args import RUN_DEFAULTS
from self_model.core.errors import ConfigError
from self_model.core.lineage import start_of
from self_model.core.modeling import count_parameters, weights_dtype
from self_model.core.run import MetricsMixin, build_training_args
from self_model.core.tracking import setup_tracking
from self_model.rlhf import policy as rlhf_model
from self_model.rlhf.config import DPOStageConfig
from self_model.rlhf.dpo.data import TOKENIZED_COLUMNS, PreferenceReport
from self_model.rlhf.policy import PolicyModels as DPOModels
from self_model.template.resolve import Template

logger = logging.getLogger("self_model")

# Defaults that differ from trl's DPOConfig; any of them can be set in training_args.
DPO_DEFAULTS: dict[str, Any] = {
    **RUN_DEFAULTS,
    # trl turns both on; like SFT, precision is asked for in the YAML (bf16: true) and checkpointing is opt-in.
    "bf16": False,
    "gradient_checkpointing": False,
}


def dpo_training_args(cfg: DPOStageConfig) -> Any:
    from trl import DPOConfig

    run_name = os.path.basename(os.path.normpath(cfg.training_args["output_dir"]))
    defaults = dict(DPO_DEFAULTS, run_name=run_name)
    if cfg.data.eval_file:
        defaults.update(eval_strategy="steps", eval_steps=DPO_DEFAULTS["save_steps"])
    loss_type = [cfg.loss_type] if isinstance(cfg.loss_type, str) else list(cfg.loss_type)
    values = dict(cfg.training_args, beta=cfg.beta, loss_type=loss_type, max_length=cfg.data.max_length)
    return build_training_args(values, DPOConfig, defaults)


def describe_reference(cfg: DPOStageConfig, precompute: bool) -> str:
    """What the reference model is for this config (logged, printed by --dry-run, saved in the run folder)."""
    return rlhf_model.describe_reference(cfg, "DPO", precompute)


def load_dpo_models(cfg: DPOStageConfig, tokenizer: Any, args: Any) -> DPOModels:
    dtype = weights_dtype(args, cfg.peft)
    return rlhf_model.load_policy(cfg, tokenizer, dtype, args.gradient_checkpointing, "DPO",
                                  reference_copy=not args.precompute_ref_log_probs,
                                  precompute=args.precompute_ref_log_probs)


def build_dpo_trainer(cfg: DPOStageConfig, models: DPOModels, tokenizer: Any, args: Any, train: Any,
                      eval_: Any) -> Any:
    from trl import DPOTrainer

    class DPORunTrainer(MetricsMixin, DPOTrainer):
        log_perplexity = False  # exp(DPO loss) means nothing

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            # The rows arrive tokenized with the chat template exactly as SFT renders them; trl's own preparation
            # would render them again with the tokenizer's chat_template and append its eos.
            if set(TOKENIZED_COLUMNS) <= set(dataset.column_names or []):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    args.report_to, callbacks = setup_tracking(cfg.trace, args.output_dir, args.run_name)
    try:
        trainer = DPORunTrainer(model=models.model, ref_model=models.ref_model, args=args, train_dataset=train,
                                eval_dataset=eval_, processing_class=tokenizer, peft_config=models.peft_config,
                                callbacks=callbacks)
    except (ValueError, NotImplementedError) as exc:
        raise ConfigError([f"trl's DPOTrainer rejected these settings: {exc}"]) from None
    rlhf_model.check_reference_adapter(cfg, trainer.model)
    trainable, total = count_parameters(trainer.model)
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    logger.info("reference model: %s", models.reference)
    return trainer


def dpo_results(trainer: Any, report: PreferenceReport, eval_report: PreferenceReport | None,
                reference: str) -> dict[str, Any]:
    """After training: the report written into final/; the frozen reference adapter is dropped so that final/
    holds the trained policy only (the reference is the SFT adapter, already on disk)."""
    dpo_report = {"train_data": report.summary(), "reference": reference, "train": last_metrics(trainer)}
    if eval_report is not None:
        dpo_report.update(eval_data=eval_report.summary(), eval=last_metrics(trainer, "eval_"))
    rlhf_model.drop_reference_adapter(trainer.accelerator.unwrap_model(trainer.model))
    return {"data_report.json": dpo_report}


def last_metrics(trainer: Any, prefix: str = "") -> dict[str, float]:
    """The last logged value of each DPO metric (rewards/*, logps/*, loss), training or eval (`prefix='eval_'`)."""
    keys = [f"{prefix}{k}" for k in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
                                     "rewards/rejected", "logps/chosen", "logps/rejected")]
    found: dict[str, float] = {}
    for entry in trainer.state.log_history:
        found.update({k: entry[k] for k in keys if k in entry})
    return found


def print_dpo_plan(cfg: DPOStageConfig, args: Any, tokenizer: Any, template: Template,
                   report: PreferenceReport, eval_report: PreferenceReport | None) -> None:
    """--dry-run: what would be trained and against which reference, on how much data, and one pair."""
    from self_model.rlhf.dpo.data import encode_pair

    mode = "QLoRA" if cfg.peft.qlora else ("LoRA" if cfg.peft.enabled else "full")
    summary = report.summary()
    losses = cfg.loss_type if isinstance(cfg.loss_type, str) else ", ".join(cfg.loss_type)
    print("\n=== dry run: nothing is trained ===")
    print(f"model:      {start_of(cfg).describe()} ({mode} DPO); loss {losses}, beta {cfg.beta}")
    print(f"reference:  {describe_reference(cfg, args.precompute_ref_log_probs)}")
    print(f"template:   {template.name}")
    print(f"train data: {summary['rows_in']} rows -> {summary['pairs_out']} pairs; identical dropped "
          f"{summary['identical_dropped']}")
    print(f"length:     max_length {summary['max_length']} ({summary['truncation']}); "
          f"truncated {summary['truncated']}, "
          f"dropped too long {summary['dropped_too_long']}, dropped (prompt fills max_length) "
          f"{summary['dropped_prompt_fills_max_length']}; prompt+reply tokens "
          f"{summary['prompt_plus_longer_reply_tokens']}")
    if eval_report is not None:
        print(f"eval data:  {eval_report.summary()['pairs_out']} pairs")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    print(f"batch:      {per_device} pairs per device x {accum} accumulation x {world} process(es) = "
          f"{per_device * accum * world} pairs per optimizer step")
    print(f"output:     {args.output_dir}")
    for fmt, pair in report.examples.items():
        prompt, chosen, rejected = encode_pair(tokenizer, template, pair)
        print(f"\n--- one pair, format '{fmt}' ({pair['source']}); the trained replies are between [[ and ]] ---")
        print(tokenizer.decode(prompt) + "[[" + tokenizer.decode(chosen) + "]]   <- chosen")
        print("... [[" + tokenizer.decode(rejected) + "]]   <- rejected")
