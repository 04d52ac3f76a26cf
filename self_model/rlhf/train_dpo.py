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
from self_model.core.dpo import (
    build_dpo_trainer,
    dpo_training_args,
    last_metrics,
    load_dpo_models,
    print_dpo_plan,
    save_dpo_final,
)
from self_model.core.modeling import load_tokenizer, resolve_template
from self_model.core.preference import build_preference_dataset
from self_model.core.schema import RLHFConfig
from self_model.core.training import is_main_process, prepare_output_dir, train_checked, write_run_info

logger = logging.getLogger("self_model")


def main(cfg: RLHFConfig, dry_run: bool = False) -> Path | None:
    args = dpo_training_args(cfg)
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
    write_run_info(args.output_dir, cfg, {"train_data": report.summary(), "reference": models.reference})
    train_checked(trainer, resume, cfg.trace, hint="Lower the learning rate or raise beta.")
    dpo_report = {"train_data": report.summary(), "reference": models.reference, "train": last_metrics(trainer)}
    if eval_ is not None:
        dpo_report.update(eval_data=eval_report.summary(), eval=last_metrics(trainer, "eval_"))
    final = save_dpo_final(trainer, tokenizer, template, cfg, {"data_report.json": dpo_report})
    if is_main_process():
        shown = dpo_report.get("eval") or dpo_report["train"]
        print(f"\nDPO result saved to {final}\nreference: {models.reference}")
        print("last logged: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    return final


if __name__ == "__main__":
    run_main(main, RLHFConfig, __doc__)
