"""GRPO: sample several replies per prompt, reward each, push the policy towards the replies that beat their group.

    uv run python self_model/rlhf/train_grpo.py --config config/self_model_config/rlhf.yaml
    uv run python self_model/rlhf/train_grpo.py --config ... --dry-run
    uv run python self_model/rlhf/train_grpo.py --config ... ppo.rollout_n=8 ppo.reward.functions=[exact_match]
    uv run python self_model/rlhf/train_grpo.py --config ... ppo.backend=verl ppo.prepare_only=true   # verl run folder

`ppo.backend: trl` trains here with trl's GRPOTrainer (CPU or GPUs); `ppo.backend: verl` writes the verl run folder
(parquet, verl_overrides.txt) and launches verl on Ray with vLLM / SGLang rollout.
"""

from __future__ import annotations

import logging
from pathlib import Path

from self_model.core.cli import run_main
from self_model.core.run import is_main_process, prepare_output_dir, train_and_save
from self_model.rlhf.config import GRPOStageConfig, log_unread_sections
from self_model.rlhf.ppo_grpo.data import load_prompt_data, trl_dataset
from self_model.rlhf.ppo_grpo.trainer import (
    build_grpo_trainer,
    grpo_results,
    grpo_training_args,
    metrics,
    print_grpo_plan,
)
from self_model.rlhf.ppo_grpo.verl_bridge import run_verl

logger = logging.getLogger("self_model")


def main(cfg: GRPOStageConfig, dry_run: bool = False) -> Path | None:
    if cfg.ppo.backend == "verl":
        return run_verl(cfg, dry_run)
    ppo = cfg.ppo
    args = grpo_training_args(cfg)
    log_unread_sections(cfg, "train_grpo.py", f"output: ppo.output_dir={args.output_dir}, learning rate: ppo.actor_lr")
    resume = None if dry_run else prepare_output_dir(args.output_dir, ppo.trl_args.get("resume_from_checkpoint"))
    (tokenizer, template), train, eval_, data = load_prompt_data(cfg)
    logger.info("train prompts: %s", data["train"])
    if dry_run:
        print_grpo_plan(cfg, args, train, data, tokenizer, template)
        return None

    trainer, reference = build_grpo_trainer(cfg, tokenizer, template, args, trl_dataset(train),
                                            trl_dataset(eval_) if eval_ else None)
    result = {"data": data, "reference": reference}
    final, _ = train_and_save(trainer, cfg, resume, tokenizer, template,
                              {"backend": "trl", "data": data, "reference": reference},
                              finish=lambda t: grpo_results(t, result), hint="Lower ppo.actor_lr.")
    if is_main_process():
        print(f"\nGRPO result saved to {final}\nreference: {reference}")
        print("last logged: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics(trainer).items()))
        if "eval_after" in result:
            before, after = result["eval_before"].get("eval_reward"), result["eval_after"].get("eval_reward")
            print(f"eval reward: {before:.4g} before training -> {after:.4g} after")
    return final


if __name__ == "__main__":
    run_main(main, GRPOStageConfig, __doc__)
