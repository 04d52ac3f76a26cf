"""KTO, ORPO and SimPO with trl: the arguments class of the loss from preference.yaml, the policy (and KTO's
reference, chosen as DPO's), trainers fed the project's tokenization, and the before / after score on the eval data.

trl tokenizes text rows with the tokenizer's chat_template and appends its own eos; these trainers receive rows
already tokenized with the project's template (rlhf.dpo.data / preference.data), exactly as SFT renders them:
KTOTrainer's dataset preparation is skipped (only trl's KL-completion rotation is kept), ORPO's and CPO's
`tokenize_row` builds their columns from the ids.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from self_model.core.backend_args import RUN_DEFAULTS
from self_model.core.errors import ConfigError
from self_model.core.lineage import start_of
from self_model.core.modeling import count_parameters, weights_dtype
from self_model.core.run import MetricsMixin, build_training_args
from self_model.core.tracking import setup_tracking
from self_model.rlhf import policy as rlhf_model
from self_model.rlhf.policy import PolicyModels
from self_model.rlhf.preference.config import PreferenceStageConfig
from self_model.template.chat_template import IGNORE_INDEX

logger = logging.getLogger("self_model")

DEFAULTS: dict[str, Any] = {
    **RUN_DEFAULTS,
    # trl turns both on; like SFT and DPO, precision is asked for in the YAML and checkpointing is opt-in.
    "bf16": False,
    "gradient_checkpointing": False,
}
# trl's name for each loss in its logs, and the metrics reported from them.
TRL_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
               "kl", "log_odds_ratio", "nll_loss")
NAMES = {"kto": "KTO", "orpo": "ORPO", "simpo": "SimPO"}


def preference_training_args(cfg: PreferenceStageConfig) -> Any:
    from trl import KTOConfig
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    args_cls = {"kto": KTOConfig, "orpo": ORPOConfig, "simpo": CPOConfig}[cfg.loss]
    run_name = os.path.basename(os.path.normpath(cfg.training_args["output_dir"]))
    defaults = dict(DEFAULTS, run_name=run_name)
    if cfg.data.eval_file:  # trl's own eval metrics from step 0 on (the "before" of its reward margins)
        defaults.update(eval_strategy="steps", eval_steps=DEFAULTS["save_steps"], eval_on_start=True)
    if cfg.loss == "simpo":  # SimPO is CPO's simpo loss without CPO's behaviour-cloning term (trl's CPOConfig docs)
        defaults.update(cpo_alpha=0.0)
    values = dict(cfg.training_args, beta=cfg.beta, max_length=cfg.data.max_length,
                  trust_remote_code=cfg.trust_remote_code)
    if cfg.loss == "simpo":
        values["loss_type"] = "simpo"
    return build_training_args(values, args_cls, defaults)


def needs_reference(cfg: PreferenceStageConfig) -> bool:
    return cfg.loss == "kto"  # ORPO and SimPO are reference-free


def load_preference_models(cfg: PreferenceStageConfig, tokenizer: Any, args: Any) -> PolicyModels:
    """The policy as DPO builds it; a reference only for KTO (ORPO and SimPO use none)."""
    dtype = weights_dtype(args, cfg.peft)
    precompute = bool(getattr(args, "precompute_ref_log_probs", False))
    models = rlhf_model.load_policy(cfg, tokenizer, dtype, args.gradient_checkpointing, NAMES[cfg.loss],  # type: ignore[arg-type]
                                    reference_copy=needs_reference(cfg) and not precompute, precompute=precompute)
    if not needs_reference(cfg):
        models.reference = f"none: {NAMES[cfg.loss]} uses no reference model"
    return models


def _pair_columns(feature: dict[str, Any]) -> dict[str, list[int]]:
    """ORPO's / CPO's tokenized columns from prompt_ids / chosen_ids / rejected_ids (labels: the reply only)."""
    prompt, out = feature["prompt_ids"], {}
    out.update(prompt_input_ids=prompt, prompt_attention_mask=[1] * len(prompt))
    for side in ("chosen", "rejected"):
        reply = feature[f"{side}_ids"]
        out.update({f"{side}_input_ids": prompt + reply, f"{side}_attention_mask": [1] * (len(prompt) + len(reply)),
                    f"{side}_labels": [IGNORE_INDEX] * len(prompt) + reply})
    return out


def trainer_class(loss: str) -> type:
    from trl import KTOTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    if loss == "kto":
        class KTORunTrainer(MetricsMixin, KTOTrainer):
            log_perplexity = False

            def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
                if "completion_ids" not in (dataset.column_names or []):
                    return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
                if not self.calculate_KL:
                    return dataset
                # trl's own KL estimate: each prompt with the completion of its neighbour in the (ordered) batch.
                def rotate(batch: dict[str, Any]) -> dict[str, Any]:
                    return {"KL_completion_ids": [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]}

                return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)

        return KTORunTrainer
    base = ORPOTrainer if loss == "orpo" else CPOTrainer

    class PairRunTrainer(MetricsMixin, base):  # type: ignore[valid-type, misc]
        log_perplexity = False

        def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, Any]:
            if "prompt_ids" in feature:
                return _pair_columns(feature)
            return super().tokenize_row(feature, model)

    return PairRunTrainer


def build_preference_trainer(cfg: PreferenceStageConfig, models: PolicyModels, tokenizer: Any, args: Any,
                             train: Any, eval_: Any) -> Any:
    args.report_to, callbacks = setup_tracking(cfg.trace, args.output_dir, args.run_name)
    kwargs: dict[str, Any] = {"ref_model": models.ref_model} if needs_reference(cfg) else {}
    try:
        trainer = trainer_class(cfg.loss)(model=models.model, args=args, train_dataset=train, eval_dataset=eval_,
                                          processing_class=tokenizer, peft_config=models.peft_config,
                                          callbacks=callbacks, **kwargs)
    except (ValueError, NotImplementedError) as exc:
        raise ConfigError([f"trl's {NAMES[cfg.loss]} trainer rejected these settings: {exc}"]) from None
    if needs_reference(cfg):
        rlhf_model.check_reference_adapter(cfg, trainer.model)  # type: ignore[arg-type]
    trainable, total = count_parameters(trainer.model)
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    logger.info("reference model: %s", models.reference)
    return trainer


# ---- before / after: the same score for every loss ------------------------------------------------------------
def eval_examples(dataset: Any) -> list[tuple[list[int], list[int], bool, int | None]]:
    """(prompt ids, reply ids, desirable, pair index) for each reply of the eval rows (pairs: both replies)."""
    if "completion_ids" in dataset.column_names:
        return [(r["prompt_ids"], r["completion_ids"], r["label"], None) for r in dataset]
    return [(r["prompt_ids"], r[f"{side}_ids"], side == "chosen", i) for i, r in enumerate(dataset)
            for side in ("chosen", "rejected")]


@torch.no_grad()
def reply_logps(model: Any, examples: list[tuple[list[int], list[int], bool, int | None]],
                summed: bool) -> list[float]:
    """Each reply's log-probability given its prompt, summed over its tokens or averaged per token (one sequence at a
    time: no padding)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for prompt, reply, _, _ in examples:
        ids = torch.tensor([prompt + reply], device=device)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
        logps = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None])
        out.append((logps.sum() if summed else logps.mean()).item())
    model.train(was_training)
    return out


def summed_logps(loss: str) -> bool:
    """The measure each loss optimizes: KTO's rewards are summed log-ratios; ORPO and SimPO average per token."""
    return loss == "kto"


def score(model: Any, examples: list[tuple[list[int], list[int], bool, int | None]],
          summed: bool) -> dict[str, float]:
    """logp_margin: the log-probability of desirable (chosen) replies minus that of undesirable (rejected) ones, the
    direction every one of these losses pushes; pair_accuracy (pairs): how often chosen beats rejected."""
    logps = reply_logps(model, examples, summed)
    good = [lp for lp, ex in zip(logps, examples) if ex[2]]
    bad = [lp for lp, ex in zip(logps, examples) if not ex[2]]
    result = {"desirable_logp": sum(good) / len(good), "undesirable_logp": sum(bad) / len(bad)}
    result["logp_margin"] = result["desirable_logp"] - result["undesirable_logp"]
    pairs: dict[int, dict[bool, float]] = {}
    for lp, (_, _, label, index) in zip(logps, examples):
        if index is not None:
            pairs.setdefault(index, {})[label] = lp
    if pairs:
        result["pair_accuracy"] = sum(p[True] > p[False] for p in pairs.values()) / len(pairs)
    return result


def trl_eval(trainer: Any, which: int) -> dict[str, float]:
    entries = [e for e in trainer.state.log_history if "eval_loss" in e]
    if not entries:
        return {}
    return {k: entries[which][f"eval_{k}"] for k in TRL_METRICS if f"eval_{k}" in entries[which]}


def preference_results(trainer: Any, cfg: PreferenceStageConfig, report: Any, eval_report: Any,
                       examples: list[Any], before: dict[str, float] | None, reference: str) -> dict[str, Any]:
    """After training: the eval data scored again (eval_results.json: before -> after), trl's metrics, the data
    report; KTO's frozen reference adapter dropped so that final/ holds the trained policy only."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    data_report = {"loss": cfg.loss, "train_data": report.summary(), "reference": reference}
    results: dict[str, Any] = {"data_report.json": data_report}
    if examples:
        step = trainer.state.global_step
        if not any("eval_loss" in e and e.get("step") == step for e in trainer.state.log_history[1:]):
            trainer.evaluate()
        data_report["eval_data"] = eval_report.summary()
        results["eval_results.json"] = {
            "loss": cfg.loss, "eval_replies": len(examples),
            "score": f"{'summed' if summed_logps(cfg.loss) else 'mean per-token'} log-prob of desirable (chosen) "
                     "minus undesirable (rejected) replies",
            "before": before, "after": score(model, examples, summed_logps(cfg.loss)),
            "trl_before": trl_eval(trainer, 0), "trl_after": trl_eval(trainer, -1)}
    rlhf_model.drop_reference_adapter(model)
    return results


def print_preference_plan(cfg: PreferenceStageConfig, args: Any, tokenizer: Any, report: Any, eval_report: Any,
                          example: tuple[list[int], list[int]] | None, reference: str) -> None:
    """--dry-run: what would be trained with which loss and reference, on how much data, and one rendered reply."""
    mode = "QLoRA" if cfg.peft.qlora else ("LoRA" if cfg.peft.enabled else "full")
    print("\n=== dry run: nothing is trained ===")
    print(f"model:      {start_of(cfg).describe()} ({mode} {NAMES[cfg.loss]}); beta {cfg.beta}")
    print(f"reference:  {reference}")
    print(f"train data: {report.summary()}")
    if eval_report is not None:
        print(f"eval data:  {eval_report.summary()} (scored before and after training)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    unit = "rows" if cfg.loss == "kto" else "pairs"
    print(f"batch:      {per_device} {unit} per device x {accum} accumulation x {world} process(es) = "
          f"{per_device * accum * world} {unit} per optimizer step")
    print(f"output:     {args.output_dir}")
    if example is not None:
        prompt, reply = example
        print("\n--- one example; the trained reply is between [[ and ]] ---")
        print(tokenizer.decode(prompt) + "[[" + tokenizer.decode(reply) + "]]")
