"""Continued pretraining: training arguments, the model (causal or masked LM, vocabulary growth), the trainer,
perplexity on the held-out text, and the --dry-run plan. The data side is in `pretrain_data.py`."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from self_model.core.backend_args import RUN_DEFAULTS
from self_model.core.errors import ConfigError, UserError
from self_model.core.lineage import start_of
from self_model.core.modeling import (
    count_parameters,
    fit_vocab_to_adapter,
    load_causal_lm,
    load_start_model,
    module_name,
    quantization_config,
    start_training,
    weights_dtype,
)
from self_model.core.run import MetricsMixin, build_training_args
from self_model.core.stage_config import PeftConfig, mutates_base
from self_model.core.tracking import setup_tracking
from self_model.core.vocab_file import extension_rows
from self_model.pretrain.config import PretrainConfig
from self_model.pretrain.data import BlockReport

logger = logging.getLogger("self_model")

EVAL_RESULTS = "eval_results.json"
# Defaults that differ from transformers'; any of them can be set in training_args.
PRETRAIN_DEFAULTS: dict[str, Any] = {
    **RUN_DEFAULTS,
    "remove_unused_columns": False,  # blocks hold exactly what the collator needs
}
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")


def pretrain_training_args(cfg: PretrainConfig) -> Any:
    from transformers import TrainingArguments

    if cfg.training_args.get("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise UserError("training_args.deepspeed is set but DeepSpeed is not installed: uv sync --extra deepspeed")
    defaults = dict(PRETRAIN_DEFAULTS, run_name=os.path.basename(os.path.normpath(cfg.training_args["output_dir"])))
    if cfg.data.eval_file:
        # eval_on_start: the perplexity before training, the baseline every later evaluation is compared with.
        defaults.update(eval_strategy="steps", eval_on_start=True,
                        eval_steps=cfg.training_args.get("save_steps", PRETRAIN_DEFAULTS["save_steps"]))
    return build_training_args(cfg.training_args, TrainingArguments, defaults)


def check_block_size(cfg: PretrainConfig) -> None:
    """A block longer than the model's context would fail at the first step (or silently degrade)."""
    from transformers import AutoConfig

    path = start_of(cfg).model  # a previous run's adapter: its base model (core.lineage)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"model_name_or_path: cannot read the model config of '{path}': {exc}") from None
    for key in CONTEXT_KEYS:
        context = getattr(config, key, None)
        if isinstance(context, int) and context > 0:
            if cfg.data.block_size > context:
                raise ConfigError([f"data.block_size: {cfg.data.block_size} is longer than the model's context "
                                   f"({key}: {context}); set data.block_size: {context} or less"])
            return


def load_masked_lm(cfg: PretrainConfig, dtype: torch.dtype, model_path: str | None = None) -> Any:
    """A BERT-style encoder with its MLM head; a checkpoint saved without one gets a new head (and says so)."""
    from transformers import AutoModelForMaskedLM

    path = model_path or cfg.model_name_or_path
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code, "output_loading_info": True}
    if cfg.peft.qlora:
        kwargs["quantization_config"] = quantization_config(cfg.peft, dtype)
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"model_name_or_path: cannot load a masked LM from '{path}': {exc}\n"
                        "objective: mlm needs a BERT-style encoder; a decoder-only model trains with objective: clm") \
            from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        logger.warning("%s has no weights for %d parameter(s) of the masked-LM head (%s): it was saved without an "
                       "MLM head, so a new head was initialised and is trained from scratch",
                       path, len(missing), ", ".join(missing[:6]))
    return model


def match_vocabulary(model: Any, tokenizer: Any, peft: PeftConfig) -> PeftConfig:
    """Grow the embeddings to an extended tokenizer (new rows = the mean of the old ones); with LoRA, train the
    grown embeddings in full (`modules_to_save`). Returns the LoRA settings to use."""
    rows, tokens = model.get_input_embeddings().num_embeddings, len(tokenizer)  # not weight.shape: 0 under ZeRO-3
    if tokens < rows and not (rows % 64 == 0 and tokens >= 0.95 * rows):
        raise UserError(f"the model has {rows} embedding rows but the tokenizer only {tokens} tokens: they do not "
                        "belong together (a model's rows exceed its tokenizer only by padding to a multiple of 64). "
                        "Use the model's own tokenizer, or one extended from it (tokenizer/).")
    # Rows tokenizer/resize_model.py added (and initialised from their sub-tokens) are new as well: train them.
    extended = extension_rows(getattr(model, "name_or_path", ""))
    if tokens <= rows and not extended:
        return peft
    if tokens > rows:
        # mean_resizing: new rows (and tied / output rows) start at the mean of the old ones, so new tokens begin
        # as an "average" token instead of random noise that would dominate the first steps.
        model.resize_token_embeddings(tokens, mean_resizing=True)
        logger.warning("vocabulary growth: the tokenizer has %d tokens, the model had %d embedding rows; resized "
                       "to %d (%d new rows initialised from the mean of the old ones)", tokens, rows, tokens,
                       tokens - rows)
    else:
        logger.warning("vocabulary extension: the model holds %d new rows added by tokenizer/resize_model.py "
                       "(initialised from the mean of their sub-tokens)", len(extended))
    if not peft.enabled:
        return peft
    if mutates_base(peft.init_lora_weights):
        raise UserError(f"peft.init_lora_weights: {peft.init_lora_weights} with a grown vocabulary: the new rows are "
                        "trained in full (modules_to_save), which peft's conversion back to the original base drops. "
                        "Use init_lora_weights: default for this continued pretraining (or peft.enabled: false)")
    names = [module_name(model, m).rsplit(".", 1)[-1] for m in (model.get_input_embeddings(),
                                                                 model.get_output_embeddings()) if m is not None]
    save = list(dict.fromkeys([*(peft.modules_to_save or []), *(n for n in names if n)]))
    logger.warning("vocabulary growth with LoRA: %s are trained in full next to the adapter "
                   "(peft.modules_to_save: %s) so the new tokens can learn", " and ".join(names), save)
    return replace(peft, modules_to_save=save)


def load_pretrain_model(cfg: PretrainConfig, tokenizer: Any, args: Any) -> Any:
    dtype = weights_dtype(args, cfg.peft)
    # The start: a base, or a previous run's result (core.lineage); a merged adapter is already in the weights.
    model, start = load_start_model(cfg, dtype, loader=load_causal_lm if cfg.objective == "clm" else load_masked_lm)
    if start.adapter:  # a continued adapter brings its own (possibly grown) embedding rows
        fit_vocab_to_adapter(model, start.adapter)
    peft = match_vocabulary(model, tokenizer, cfg.peft)
    if args.gradient_checkpointing and not peft.qlora:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if peft.enabled:
            model.enable_input_require_grads()  # frozen embeddings: give checkpointed blocks a grad path
    model = start_training(model, start, peft, gradient_checkpointing=args.gradient_checkpointing,
                           task_type="CAUSAL_LM" if cfg.objective == "clm" else None)
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def pretrain_collator(tokenizer: Any, cfg: PretrainConfig) -> Any:
    """mlm: transformers' masking collator. clm: blocks already carry labels (-100 on padding only), so the plain
    collator stacks them; DataCollatorForLanguageModeling(mlm=False) would also hide every label equal to the
    pad id, and pad is eos for most causal LMs: the model would never learn where a document ends."""
    from transformers import DataCollatorForLanguageModeling, default_data_collator

    if cfg.objective == "mlm":
        return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=cfg.mlm_probability)
    return default_data_collator


def eval_results_callback() -> Any:
    """Writes every evaluation (step, eval_loss, eval_perplexity) to <output_dir>/eval_results.json."""
    from transformers import TrainerCallback

    class EvalResults(TrainerCallback):
        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                        **kwargs: Any) -> None:
            if not state.is_world_process_zero or not metrics or "eval_loss" not in metrics:
                return
            path = Path(args.output_dir) / EVAL_RESULTS
            rows = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
            rows = [r for r in rows if r["step"] != state.global_step]  # a resumed run evaluates its start again
            loss = float(metrics["eval_loss"])
            rows.append({"step": state.global_step, "epoch": state.epoch, "eval_loss": loss,
                         "eval_perplexity": math.exp(min(loss, 50.0))})
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(sorted(rows, key=lambda r: r["step"]), indent=2), encoding="utf-8")

    return EvalResults()


def build_pretrain_trainer(cfg: PretrainConfig, model: Any, tokenizer: Any, args: Any, train: Any,
                           eval_: Any) -> Any:
    from transformers import Trainer

    class PretrainRunTrainer(MetricsMixin, Trainer):
        pass

    args.report_to, callbacks = setup_tracking(cfg.trace, args.output_dir, args.run_name)
    return PretrainRunTrainer(model=model, args=args, train_dataset=train, eval_dataset=eval_,
                              data_collator=pretrain_collator(tokenizer, cfg), processing_class=tokenizer,
                              callbacks=[*callbacks, eval_results_callback()])


def final_evaluation(trainer: Any) -> list[dict[str, Any]]:
    """Evaluate once more unless the last step was just evaluated; return every evaluation of the run."""
    if trainer.eval_dataset is None:
        return []
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    if not evals or evals[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()
    path = Path(trainer.args.output_dir) / EVAL_RESULTS
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def print_plan(cfg: PretrainConfig, targs: Any, report: BlockReport, eval_report: BlockReport | None) -> None:
    """--dry-run: what would be trained, on how many blocks, with which batch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device, accum = targs.per_device_train_batch_size, targs.gradient_accumulation_steps
    mode = "QLoRA" if cfg.peft.qlora else ("LoRA" if cfg.peft.enabled else "all weights")
    print("\n=== dry run: nothing is trained ===")
    print(f"model:      {start_of(cfg).describe()} ({cfg.objective}, {mode})")
    print(f"train data: {report.line()}")
    if eval_report is not None:
        print(f"eval data:  {eval_report.line()}")
    print(f"batch:      {per_device} blocks per device x {accum} accumulation x {world} process(es) = "
          f"{per_device * accum * world * cfg.data.block_size} tokens per optimizer step")
    print(f"precision:  {'bf16' if targs.bf16 else 'fp16' if targs.fp16 else 'fp32'}")
    print(f"output:     {cfg.training_args['output_dir']}")
