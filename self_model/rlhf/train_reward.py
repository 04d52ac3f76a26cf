"""Reward model: a sequence classifier (one score) trained on preference pairs, for PPO / GRPO to score replies.

    uv run python self_model/rlhf/train_reward.py --config config/self_model_config/reward.yaml
    uv run python self_model/rlhf/train_reward.py --config ... --dry-run
    uv run python self_model/rlhf/train_reward.py --config ... peft.enabled=false training_args.learning_rate=1.0e-5

Then in rlhf.yaml: ppo.reward.reward_model_name_or_path: <training_args.output_dir>/final
"""

from __future__ import annotations

import logging
from pathlib import Path

from self_model.core.cli import run_main
from self_model.core.modeling import load_tokenizer
from self_model.core.run import is_main_process, prepare_output_dir, train_and_save
from self_model.rlhf.dpo.data import build_preference_dataset
from self_model.rlhf.reward.config import RewardStageConfig
from self_model.rlhf.reward.trainer import (
    build_reward_trainer,
    closing_ids,
    load_reward_model,
    print_reward_plan,
    reward_results,
    reward_training_args,
    to_sequences,
)
from self_model.template.resolve import resolve_template

logger = logging.getLogger("self_model")


def main(cfg: RewardStageConfig, dry_run: bool = False) -> Path | None:
    args = reward_training_args(cfg)
    resume = None if dry_run else prepare_output_dir(args.output_dir, cfg.training_args.get("resume_from_checkpoint"))
    tokenizer = load_tokenizer(cfg)
    template = resolve_template(cfg, tokenizer)
    pairs, report = build_preference_dataset(cfg.data.train_file, tokenizer, template, cfg.data, cfg.data.max_samples,
                                            "the reward model")
    closing = closing_ids(tokenizer, template)
    train = to_sequences(pairs, closing)
    eval_, eval_report = (build_preference_dataset(cfg.data.eval_file, tokenizer, template, cfg.data,
                                                   stage="the reward model") if cfg.data.eval_file else (None, None))
    eval_ = to_sequences(eval_, closing) if eval_ is not None else None
    logger.info("train data: %s", report.summary())
    if dry_run:
        print_reward_plan(cfg, args, tokenizer, report, eval_report, train[0])
        return None

    model = load_reward_model(cfg, tokenizer, args)
    trainer = build_reward_trainer(cfg, model, tokenizer, args, train, eval_)
    final, results = train_and_save(trainer, cfg, resume, tokenizer, template, {"train_data": report.summary()},
                                    finish=lambda t: reward_results(t, cfg, report, eval_report))
    if is_main_process():
        print(f"\nReward model saved to {final} (full weights; AutoModelForSequenceClassification)")
        if "eval_results.json" in results:
            before, after = results["eval_results.json"]["before"], results["eval_results.json"]["after"]
            print(f"pairwise accuracy on eval: {before.get('accuracy', float('nan')):.3f} -> "
                  f"{after.get('accuracy', float('nan')):.3f}; margin {before.get('margin', float('nan')):.3f} -> "
                  f"{after.get('margin', float('nan')):.3f}")
        print(f"use it in rlhf.yaml: ppo.reward.reward_model_name_or_path: {final}")
    return final


if __name__ == "__main__":
    run_main(main, RewardStageConfig, __doc__)
