"""Continued pretraining (causal LM, or masked LM for BERT-style encoders) from one YAML.

    uv run python self_model/pretrain/train_pretrain.py --config config/self_model_config/pretrain.yaml
    uv run python self_model/pretrain/train_pretrain.py --config ... --dry-run data.block_size=256
    torchrun --nproc_per_node 4 self_model/pretrain/train_pretrain.py --config config/self_model_config/pretrain.yaml
    deepspeed --num_gpus 4 self_model/pretrain/train_pretrain.py --config ... \\
        --deepspeed config/self_model_config/deepspeed/ds_zero2.json
"""

from __future__ import annotations

from pathlib import Path

from self_model.core.cli import run_main
from self_model.core.dataset_mix import plan_lines
from self_model.core.modeling import load_tokenizer
from self_model.core.run import is_main_process, prepare_output_dir, train_and_save
from self_model.pretrain.config import PretrainConfig
from self_model.pretrain.data import check_tokenizer, load_blocks
from self_model.pretrain.trainer import (
    build_pretrain_trainer,
    check_block_size,
    final_evaluation,
    load_pretrain_model,
    pretrain_training_args,
    print_plan,
)


def main(cfg: PretrainConfig, dry_run: bool = False) -> Path | None:
    args = pretrain_training_args(cfg)
    resume = None if dry_run else prepare_output_dir(args.output_dir, cfg.training_args.get("resume_from_checkpoint"))
    check_block_size(cfg)
    tokenizer = load_tokenizer(cfg, model_must_fit=False)  # continued pretraining grows the embeddings
    check_tokenizer(tokenizer, cfg)
    # Rank 0 tokenizes (and caches) first; the other processes then load its cache.
    with args.main_process_first(desc="tokenizing the corpus"):
        train, report = load_blocks(cfg.data.train_file, tokenizer, cfg, "train", cfg.data.streaming)
        eval_, eval_report = (load_blocks(cfg.data.eval_file, tokenizer, cfg, "eval")
                              if cfg.data.eval_file else (None, None))
    if dry_run:
        print_plan(cfg, args, report, eval_report)
        if report.corpus.get("mix"):  # data.datasets: rows per data set, its share of the mix
            print("\n".join(plan_lines(report.corpus["mix"], cfg.data.mix, cfg.data.mix_seed)))
        return None

    model = load_pretrain_model(cfg, tokenizer, args)
    trainer = build_pretrain_trainer(cfg, model, tokenizer, args, train, eval_)
    data_report = {"train": report.summary(), "eval": eval_report.summary() if eval_report else None}
    final, results = train_and_save(trainer, cfg, resume, tokenizer, None, {"train_data": report.summary()},
                                    finish=lambda t: {"data_report.json": data_report,
                                                      "eval_results.json": final_evaluation(t)})
    evals = results["eval_results.json"]
    if is_main_process():
        print(f"\npretrained model saved to {final}")
        if evals:
            print(f"eval perplexity: {evals[0]['eval_perplexity']:.2f} at step {evals[0]['step']} -> "
                  f"{evals[-1]['eval_perplexity']:.2f} at step {evals[-1]['step']}")
    return final


if __name__ == "__main__":
    run_main(main, PretrainConfig, __doc__)
