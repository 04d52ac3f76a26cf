"""Direct preference optimisation (DPO) with trl, from an SFT result (a merged model or base + SFT LoRA adapter).

    uv run python self_model/rlhf/train_dpo.py --config config/self_model_config/rlhf.yaml
    uv run python self_model/rlhf/train_dpo.py --config ... --dry-run
    uv run python self_model/rlhf/train_dpo.py --config ... loss_type=ipo beta=0.5 peft.qlora=true
    torchrun --nproc_per_node 2 self_model/rlhf/train_dpo.py --config ...
"""

from __future__ import annotations

import logging
from pathlib import Path

from self_model.core.cli import run_main
from self_model.core.modeling import load_tokenizer
from self_model.core.run import is_main_process, prepare_output_dir, train_and_save
from self_model.rlhf.config import DPOStageConfig, log_unread_sections
from self_model.rlhf.dpo.data import build_preference_dataset
from self_model.rlhf.dpo.trainer import (
    build_dpo_trainer,
    dpo_results,
    dpo_training_args,
    load_dpo_models,
    print_dpo_plan,
)
from self_model.template.resolve import resolve_template

logger = logging.getLogger("self_model")


def main(cfg: DPOStageConfig, dry_run: bool = False) -> Path | None:
    args = dpo_training_args(cfg)
    log_unread_sections(cfg, "train_dpo.py", f"output: training_args.output_dir={args.output_dir}")
    resume = None if dry_run else prepare_output_dir(args.output_dir, cfg.training_args.get("resume_from_checkpoint"))
    tokenizer = load_tokenizer(cfg)
    template = resolve_template(cfg, tokenizer)
    train, report = build_preference_dataset(cfg.data.train_file, tokenizer, template, cfg.data, cfg.data.max_samples)
    eval_, eval_report = (build_preference_dataset(cfg.data.eval_file, tokenizer, template, cfg.data)
                          if cfg.data.eval_file else (None, None))
    logger.info("train data: %s", report.summary())
    if dry_run:
        print_dpo_plan(cfg, args, tokenizer, template, report, eval_report)
        return None

    models = load_dpo_models(cfg, tokenizer, args)
    trainer = build_dpo_trainer(cfg, models, tokenizer, args, train, eval_)
    final, results = train_and_save(
        trainer, cfg, resume, tokenizer, template, {"train_data": report.summary(), "reference": models.reference},
        finish=lambda t: dpo_results(t, report, eval_report, models.reference),
        hint="Lower the learning rate or raise beta.")
    if is_main_process():
        dpo_report = results["data_report.json"]
        shown = dpo_report.get("eval") or dpo_report["train"]
        print(f"\nDPO result saved to {final}\nreference: {models.reference}")
        print("last logged: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    return final


if __name__ == "__main__":
    run_main(main, DPOStageConfig, __doc__)
