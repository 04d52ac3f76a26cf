"""KTO, ORPO and SimPO with trl (`loss:`), from an SFT result (a merged model or base + SFT LoRA adapter).

    uv run python self_model/rlhf/train_preference.py --config config/self_model_config/preference.yaml
    uv run python self_model/rlhf/train_preference.py --config ... --dry-run
    uv run python self_model/rlhf/train_preference.py --config ... loss=orpo \
        data.train_file=data_process/sample_data/dpo_train.jsonl data.eval_file=data_process/sample_data/dpo_eval.jsonl
    uv run python self_model/rlhf/train_preference.py --config ... loss=simpo beta=2.0 training_args.simpo_gamma=0.5

kto: unpaired rows marked desirable or not (label / kto_tag), or pairs split; orpo, simpo: pairs, no reference model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from self_model.core.cli import run_main
from self_model.core.modeling import load_tokenizer
from self_model.core.run import is_main_process, prepare_output_dir, train_and_save
from self_model.rlhf.dpo.data import build_preference_dataset
from self_model.rlhf.policy import describe_reference
from self_model.rlhf.preference.config import PreferenceStageConfig
from self_model.rlhf.preference.data import build_kto_dataset
from self_model.rlhf.preference.trainer import (
    NAMES,
    build_preference_trainer,
    eval_examples,
    load_preference_models,
    needs_reference,
    preference_results,
    preference_training_args,
    print_preference_plan,
    score,
    summed_logps,
)
from self_model.template.resolve import Template, resolve_template

logger = logging.getLogger("self_model")


def build_data(cfg: PreferenceStageConfig, files: str | list[str] | None, tokenizer: Any, template: Template,
               limit: int | None = None) -> tuple[Any, Any]:
    """KTO: rows marked desirable or not (pairs split); ORPO / SimPO: pairs, read as DPO reads them."""
    if cfg.loss == "kto":
        return build_kto_dataset(files, tokenizer, template, cfg.data, limit)
    return build_preference_dataset(files, tokenizer, template, cfg.data, limit, stage=NAMES[cfg.loss])


def main(cfg: PreferenceStageConfig, dry_run: bool = False) -> Path | None:
    args = preference_training_args(cfg)
    resume = None if dry_run else prepare_output_dir(args.output_dir, cfg.training_args.get("resume_from_checkpoint"))
    tokenizer = load_tokenizer(cfg)
    template = resolve_template(cfg, tokenizer)
    train, report = build_data(cfg, cfg.data.train_file, tokenizer, template, cfg.data.max_samples)
    eval_, eval_report = build_data(cfg, cfg.data.eval_file, tokenizer, template) if cfg.data.eval_file else (None,
                                                                                                           None)
    examples = eval_examples(eval_) if eval_ is not None else []
    logger.info("train data: %s", report.summary())
    if dry_run:
        reference = (describe_reference(cfg, NAMES[cfg.loss]) if needs_reference(cfg)  # type: ignore[arg-type]
                     else f"none: {NAMES[cfg.loss]} uses no reference model")
        first = eval_examples(train)[0]
        print_preference_plan(cfg, args, tokenizer, report, eval_report, first[:2], reference)
        return None

    models = load_preference_models(cfg, tokenizer, args)
    trainer = build_preference_trainer(cfg, models, tokenizer, args, train, eval_)
    # The start, scored before training (a new LoRA adapter changes nothing yet).
    before = score(trainer.model, examples, summed_logps(cfg.loss)) if examples else None
    final, results = train_and_save(
        trainer, cfg, resume, tokenizer, template, {"train_data": report.summary(), "reference": models.reference},
        finish=lambda t: preference_results(t, cfg, report, eval_report, examples, before, models.reference),
        hint="Lower the learning rate (or raise beta).")
    if is_main_process():
        print(f"\n{NAMES[cfg.loss]} result saved to {final}\nreference: {models.reference}")
        if "eval_results.json" in results:
            shown = results["eval_results.json"]
            print(f"eval log-prob margin (desirable - undesirable): {shown['before']['logp_margin']:.4f} -> "
                  f"{shown['after']['logp_margin']:.4f}")
    return final


if __name__ == "__main__":
    run_main(main, PreferenceStageConfig, __doc__)
