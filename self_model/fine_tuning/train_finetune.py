"""Supervised fine-tuning (full, LoRA or QLoRA) from one YAML.

    uv run python self_model/fine_tuning/train_finetune.py --config config/self_model_config/finetune.yaml
    uv run python self_model/fine_tuning/train_finetune.py --config ... --trace swanlab
    uv run python self_model/fine_tuning/train_finetune.py --config ... --dry-run training_args.learning_rate=1.0e-4
    torchrun --nproc_per_node 2 self_model/fine_tuning/train_finetune.py --config ...
"""

from __future__ import annotations

import logging
from pathlib import Path

from self_model.core.cli import run_main
from self_model.core.conversations import first_prompt
from self_model.core.inference import chat
from self_model.core.modeling import load_tokenizer
from self_model.core.run import is_main_process, prepare_output_dir, train_and_save, weights_partitioned
from self_model.fine_tuning.config import FinetuneConfig
from self_model.fine_tuning.data import build_sft_dataset
from self_model.fine_tuning.trainer import build_sft_trainer, load_model_for_training, print_plan, sft_training_args
from self_model.template.resolve import resolve_template

logger = logging.getLogger("self_model")


def main(cfg: FinetuneConfig, dry_run: bool = False) -> Path | None:
    args = sft_training_args(cfg)
    resume = None if dry_run else prepare_output_dir(args.output_dir, cfg.training_args.get("resume_from_checkpoint"))
    tokenizer = load_tokenizer(cfg)
    template = resolve_template(cfg, tokenizer)
    train, report = build_sft_dataset(cfg.data.train_file, tokenizer, template, cfg.data, cfg.data.max_samples)
    eval_, eval_report = (build_sft_dataset(cfg.data.eval_file, tokenizer, template, cfg.data)
                          if cfg.data.eval_file else (None, None))
    logger.info("train data: %s", report.summary())
    if dry_run:
        print_plan(cfg, args, tokenizer, template, train, report, eval_report)
        return None

    model = load_model_for_training(cfg, tokenizer, args)
    trainer = build_sft_trainer(cfg, model, tokenizer, args, train, eval_)
    final, _ = train_and_save(trainer, cfg, resume, tokenizer, template, {"train_data": report.summary()},
                              finish=lambda _: {"data_report.json": report.summary()})
    if is_main_process() and weights_partitioned(trainer):  # a forward pass on rank 0 alone would hang
        print(f"\nfine-tuned model saved to {final}\n(try it: python self_model/tools/chat.py --model {final})")
    elif is_main_process():
        files = cfg.data.eval_file or cfg.data.train_file
        sample = next(iter(report.examples.values()))["messages"]  # data.datasets: the mix's first conversation
        prompt = first_prompt(files) if files else sample[:[m["role"] for m in sample].index("assistant")]
        answer = chat(trainer.model, tokenizer, prompt, folder=final)  # the chat CLI's code, final/'s stop ids
        print(f"\nfine-tuned model saved to {final}\n\nQ: {prompt[-1]['content']}\nA: {answer}")
    return final


if __name__ == "__main__":
    run_main(main, FinetuneConfig, __doc__)
