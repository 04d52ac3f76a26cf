"""The reward-model stage's building blocks: trl's RewardConfig from reward.yaml, the classifier, the trainer, the
pairwise accuracy before and after training, and a final/ that PPO / GRPO load as a reward model.

The model is `AutoModelForSequenceClassification` with one label on the start's weights (a base, or an SFT result
with its adapter merged in): the transformer is the start's, the score head is new. It reads the score at the last
non-padding token, so each sequence is prompt + reply rendered with the project's chat template, ending on the
template's end-of-turn token, exactly as DPO and SFT render them (and as trl's GRPO renders prompt + reply with the
chat_template saved in final/).

A LoRA reward model is saved merged: final/ holds full weights, which verl's `reward_model.model_path` and trl's GRPO
load with `AutoModelForSequenceClassification` (neither loads an adapter as a reward model).
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch

from self_model.core.backend_args import RUN_DEFAULTS
from self_model.core.errors import ConfigError, UserError
from self_model.core.lineage import start_of
from self_model.core.modeling import (
    apply_peft,
    check_vocab,
    count_parameters,
    load_start_model,
    quantization_config,
    weights_dtype,
)
from self_model.core.run import MetricsMixin, build_training_args
from self_model.core.tracking import setup_tracking
from self_model.rlhf.dpo.data import PreferenceReport
from self_model.rlhf.reward.config import RewardStageConfig
from self_model.template.resolve import Template

logger = logging.getLogger("self_model")

REWARD_DEFAULTS: dict[str, Any] = {
    **RUN_DEFAULTS,
    # trl turns both on; like the other stages, precision is asked for in the YAML and checkpointing is opt-in.
    "bf16": False,
    "gradient_checkpointing": False,
}
# What eval_results.json reports before and after training (trl's RewardTrainer logs them as eval_*).
REWARD_METRICS = ("accuracy", "margin", "loss", "mean_reward")


def reward_training_args(cfg: RewardStageConfig) -> Any:
    from trl import RewardConfig

    run_name = os.path.basename(os.path.normpath(cfg.training_args["output_dir"]))
    defaults = dict(REWARD_DEFAULTS, run_name=run_name)
    if cfg.data.eval_file:  # pairwise accuracy of the untrained head first: the "before" of eval_results.json
        defaults.update(eval_strategy="steps", eval_steps=REWARD_DEFAULTS["save_steps"], eval_on_start=True)
    # data.max_length's policy (truncate / drop, reported) already bounded prompt + reply; trl's own filter would drop
    # pairs silently for the template's closing ids (closing_ids) on top of it.
    values = dict(cfg.training_args, max_length=None, trust_remote_code=cfg.trust_remote_code)
    return build_training_args(values, RewardConfig, defaults)


def closing_ids(tokenizer: Any, template: Template) -> list[int]:
    """The ids the template renders after a reply's trained span (chatml: the newline after <|im_end|>).

    DPO's reply ids stop at the end-of-turn token; trl's GRPO and verl score the whole rendered conversation (the
    reward model's chat_template), which ends with these ids. The score is read at the last token, so training ends
    every sequence the same way."""
    from self_model.template.chat_template import IGNORE_INDEX

    ids, labels = template.encode(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                  True)
    last = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return ids[last + 1:]


def to_sequences(dataset: Any, closing: list[int]) -> Any:
    """DPO's rows (prompt_ids, chosen_ids, rejected_ids) as the two whole rendered conversations the classifier
    scores (a reply cut by data.truncation too: GRPO renders a clipped reply as a closed turn as well)."""
    return dataset.map(lambda r: {"chosen_ids": r["prompt_ids"] + r["chosen_ids"] + closing,
                                  "rejected_ids": r["prompt_ids"] + r["rejected_ids"] + closing},
                       remove_columns=["prompt_ids"])


def load_classifier(cfg: RewardStageConfig, dtype: torch.dtype, path: str) -> Any:
    """`load_start_model`'s loader: the start's transformer with a new one-score head."""
    from transformers import AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code, "num_labels": 1}
    if cfg.peft.qlora:
        kwargs["quantization_config"] = quantization_config(cfg.peft, dtype)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"model_name_or_path: cannot load '{path}' as a sequence classifier: "
                        f"{str(exc)[:400]}") from None
    model.config.use_cache = False
    return model


def classifier_from(lm: Any, cfg: RewardStageConfig, dtype: torch.dtype) -> Any:
    """A classifier around a causal LM already in memory (an SFT adapter merged into its base): the same transformer
    weights (`base_model`, the part both heads share), a new score head. peft cannot load a language-model adapter
    onto a classifier directly, so the adapter is merged into the language model first."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(lm.config)
    config.num_labels, config.architectures = 1, None
    model = AutoModelForSequenceClassification.from_config(config, dtype=dtype,
                                                           trust_remote_code=cfg.trust_remote_code)
    model.base_model.load_state_dict(lm.base_model.state_dict())  # strict: every transformer weight is carried over
    model.config.use_cache = False
    return model


def load_reward_model(cfg: RewardStageConfig, tokenizer: Any, args: Any) -> Any:
    """The classifier to train: full weights, or a new LoRA (task SEQ_CLS: the score head trains in full)."""
    dtype = weights_dtype(args, cfg.peft)
    start = start_of(cfg)
    if start.merged:  # the SFT model = base + its adapter(s), merged as a language model, then given a score head
        lm, _ = load_start_model(cfg, dtype)
        model = classifier_from(lm, cfg, dtype)
        del lm
    else:
        model = load_classifier(cfg, dtype, start.model)
    check_vocab(model, tokenizer)
    # The score is read at the last token that is not padding: the model must know which id pads.
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.peft.enabled:
        return apply_peft(model, cfg.peft, args.gradient_checkpointing, task_type="SEQ_CLS")
    return model.requires_grad_(True)


def build_reward_trainer(cfg: RewardStageConfig, model: Any, tokenizer: Any, args: Any, train: Any,
                         eval_: Any) -> Any:
    from trl import RewardTrainer

    class RewardRunTrainer(MetricsMixin, RewardTrainer):
        log_perplexity = False  # the loss is -log sigmoid(margin): no perplexity

    args.report_to, callbacks = setup_tracking(cfg.trace, args.output_dir, args.run_name)
    try:  # the rows arrive tokenized (chosen_ids / rejected_ids): trl skips its own chat-template rendering
        trainer = RewardRunTrainer(model=model, args=args, train_dataset=train, eval_dataset=eval_,
                                   processing_class=tokenizer, callbacks=callbacks)
    except (ValueError, NotImplementedError, TypeError) as exc:
        raise ConfigError([f"trl's RewardTrainer rejected these settings: {exc}"]) from None
    trainable, total = count_parameters(trainer.model)
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return trainer


def eval_metrics(trainer: Any, which: int) -> dict[str, float]:
    """One logged evaluation (0: the first, before training; -1: the last) as {accuracy, margin, ...}."""
    entries = [e for e in trainer.state.log_history if "eval_accuracy" in e]
    if not entries:
        return {}
    return {k: entries[which][f"eval_{k}"] for k in REWARD_METRICS if f"eval_{k}" in entries[which]}


def reward_results(trainer: Any, cfg: RewardStageConfig, report: PreferenceReport,
                   eval_report: PreferenceReport | None) -> dict[str, Any]:
    """After training: pairwise accuracy on the eval pairs before -> after (eval_results.json), the data report, and
    a LoRA model merged so that final/ holds full weights."""
    results: dict[str, Any] = {"data_report.json": {"train_data": report.summary()}}
    if eval_report is not None:
        step = trainer.state.global_step
        if not any("eval_accuracy" in e and e.get("step") == step for e in trainer.state.log_history[1:]):
            trainer.evaluate()
        results["data_report.json"]["eval_data"] = eval_report.summary()
        results["eval_results.json"] = {"eval_pairs": eval_report.summary()["pairs_out"],
                                        "before": eval_metrics(trainer, 0), "after": eval_metrics(trainer, -1)}
    if cfg.peft.enabled:
        # verl and trl load a reward model as full weights; the adapter would be read as a causal LM's.
        trainer.model = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        trainer.model_wrapped = trainer.model
    return results


def print_reward_plan(cfg: RewardStageConfig, args: Any, tokenizer: Any, report: PreferenceReport,
                      eval_report: PreferenceReport | None, example: dict[str, Any] | None) -> None:
    """--dry-run: what would be trained, on how much data, and one scored sequence."""
    mode = "QLoRA" if cfg.peft.qlora else ("LoRA, saved merged" if cfg.peft.enabled else "full")
    summary = report.summary()
    print("\n=== dry run: nothing is trained ===")
    print(f"model:      {start_of(cfg).describe()} + a new one-score head ({mode} reward model)")
    print(f"train data: {summary['rows_in']} rows -> {summary['pairs_out']} pairs; truncated {summary['truncated']}, "
          f"dropped too long {summary['dropped_too_long']}; prompt+reply tokens "
          f"{summary['prompt_plus_longer_reply_tokens']}")
    if eval_report is not None:
        print(f"eval data:  {eval_report.summary()['pairs_out']} pairs (pairwise accuracy before and after)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    print(f"batch:      {per_device} pairs per device x {accum} accumulation x {world} process(es) = "
          f"{per_device * accum * world} pairs per optimizer step")
    print(f"output:     {args.output_dir}")
    if example is not None:
        print("\n--- one pair as scored (the score is read at the last token) ---")
        print(tokenizer.decode(example["chosen_ids"]) + "   <- chosen")
        print(tokenizer.decode(example["rejected_ids"]) + "   <- rejected")
