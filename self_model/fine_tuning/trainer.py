"""The SFT stage's building blocks: training arguments, the trainer, and the --dry-run plan."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from self_model.core.attention import use_varlen_attention
from self_model.core.backend_args import RUN_DEFAULTS
from self_model.core.dataset_mix import plan_lines
from self_model.core.errors import UserError
from self_model.core.lineage import start_of
from self_model.core.modeling import (
    apply_peft,
    check_vocab,
    count_parameters,
    load_start_model,
    start_training,
    weights_dtype,
)
from self_model.core.run import MetricsMixin, build_training_args
from self_model.core.stage_config import StageConfig
from self_model.core.tracking import setup_tracking
from self_model.fine_tuning.config import FinetuneConfig
from self_model.fine_tuning.data import TokenizeReport, keep_trained_hidden_states, make_collator, render_marked
from self_model.template.resolve import Template

logger = logging.getLogger("self_model")

# Defaults that differ from transformers' for a fine-tuning run; any of them can be set in training_args.
SFT_DEFAULTS: dict[str, Any] = {
    **RUN_DEFAULTS,
    "remove_unused_columns": False,  # rows are already input_ids + labels
}


def sft_training_args(cfg: FinetuneConfig) -> Any:
    from transformers import TrainingArguments

    run_name = os.path.basename(os.path.normpath(cfg.training_args["output_dir"]))
    defaults = dict(SFT_DEFAULTS, run_name=run_name)
    if cfg.data.eval_file:
        defaults.update(eval_strategy="steps", eval_steps=SFT_DEFAULTS["save_steps"])
    return build_training_args(cfg.training_args, TrainingArguments, defaults)


def load_model_for_training(cfg: StageConfig, tokenizer: Any, args: Any) -> Any:
    """The starting weights (a base or a previous run's result, core.lineage) with `peft:` or the continued adapter."""
    dtype = weights_dtype(args, cfg.peft)
    model, start = load_start_model(cfg, dtype)
    if args.gradient_checkpointing and not cfg.peft.qlora:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.peft.enabled:
            model.enable_input_require_grads()  # frozen embeddings: give checkpointed blocks a grad path
    if cfg.data.packing and use_varlen_attention(model):
        logger.info("packing: per-document attention (sdpa_varlen) keeps the packed samples apart")
    model = start_training(model, start, cfg.peft, gradient_checkpointing=args.gradient_checkpointing)
    check_vocab(model, tokenizer)  # after a continued adapter, which may carry grown embedding rows
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def build_sft_trainer(cfg: FinetuneConfig, model: Any, tokenizer: Any, args: Any, train: Any, eval_: Any) -> Any:
    from transformers import Trainer

    class SFTRunTrainer(MetricsMixin, Trainer):
        pass

    args.report_to, callbacks = setup_tracking(cfg.trace, args.output_dir, args.run_name)
    return SFTRunTrainer(model=model, args=args, train_dataset=train, eval_dataset=eval_,
                         data_collator=make_collator(tokenizer, cfg.data.packing, keep_trained_hidden_states(model)),
                         processing_class=tokenizer,
                         callbacks=callbacks)


def estimate_trainable(cfg: StageConfig) -> tuple[int, int]:
    """Trainable / total parameters without loading weights (the model is built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    start = start_of(cfg)
    try:
        config = AutoConfig.from_pretrained(start.model, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"model_name_or_path: cannot read the model config of '{start.model}': {exc}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
        if start.adapter:  # trained further as it is: its own r / alpha / targets
            from peft import PeftConfig as LoadedPeftConfig
            from peft import get_peft_model

            loaded = LoadedPeftConfig.from_pretrained(start.adapter)
            loaded.inference_mode = False
            model = get_peft_model(model, loaded)
        elif cfg.peft.enabled:
            from dataclasses import replace

            model = apply_peft(model, replace(cfg.peft, qlora=False, init_lora_weights="default"))  # counts only
    return count_parameters(model)


def print_plan(cfg: FinetuneConfig, targs: Any, tokenizer: Any, template: Template, train: Any,
               report: TokenizeReport, eval_report: TokenizeReport | None) -> None:
    """--dry-run: what would be trained, on how much data, and one sample with its trained span marked."""
    args = dict(cfg.training_args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = args.get("per_device_train_batch_size", 8)
    accum = args.get("gradient_accumulation_steps", 1)
    trainable, total = estimate_trainable(cfg)
    mode = "QLoRA" if cfg.peft.qlora else ("LoRA" if cfg.peft.enabled else "full fine-tuning")
    variants = [n for n, on in (("DoRA", cfg.peft.use_dora), ("rsLoRA", cfg.peft.use_rslora),
                                (f"init {cfg.peft.init_lora_weights}", cfg.peft.init_lora_weights != "default")) if on]
    mode += f" with {', '.join(variants)}" if variants else ""
    summary = report.summary()
    print("\n=== dry run: nothing is trained ===")
    print(f"model:      {start_of(cfg).describe()} ({mode}); trainable {trainable:,} of {total:,} parameters "
          f"({100 * trainable / max(total, 1):.2f}%)")
    print(f"template:   {template.name}")
    print(f"train data: {summary['rows_in']} rows -> {summary['rows_out']} samples; tokens {summary['tokens']}; "
          f"trained tokens {summary['trained_tokens']}")
    print(f"length:     max_length {cfg.data.max_length}; truncated {summary['truncated']}, dropped too long "
          f"{summary['dropped_too_long']}, dropped with nothing to train {summary['dropped_no_trainable_tokens']}")
    for line in plan_lines(report.mix, cfg.data.mix, cfg.data.mix_seed) if report.mix else []:
        print(line)
    if eval_report is not None:
        print(f"eval data:  {eval_report.summary()['rows_out']} samples")
    print(f"batch:      {per_device} per device x {accum} accumulation x {world} process(es) = "
          f"{per_device * accum * world} samples per optimizer step; packing {cfg.data.packing}")
    print(f"precision:  {'bf16' if targs.bf16 else 'fp16' if targs.fp16 else 'fp32'}")
    print(f"output:     {cfg.training_args['output_dir']}")
    print_samples(tokenizer, template, cfg.data.mask_history, report)


def print_samples(tokenizer: Any, template: Template, mask_history: bool, report: TokenizeReport) -> None:
    """One rendered sample per data format, the trained tokens between [[ and ]]."""
    print("\none rendered sample per data format; the trained tokens are between [[ and ]]:")
    for fmt, sample in report.examples.items():
        ids, labels = template.encode(tokenizer, sample["messages"], mask_history, sample.get("tools"))
        print(f"\n--- format '{fmt}' ({sample['source']}) ---")
        print(render_marked(tokenizer, ids, labels))
