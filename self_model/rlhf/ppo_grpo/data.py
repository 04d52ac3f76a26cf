"""Prompt data for PPO / GRPO: the rows (read by core.prompt_rows, which documents their shapes) measured with the
chat template exactly as they will be rendered for generation; prompts over `max_prompt_length` stop the run
(`prompt_truncation: error`) or are dropped and counted (`drop`); then verl's parquet or trl's dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from self_model.core.dataset_mix import mix_sources, sources
from self_model.core.errors import DataError, UserError
from self_model.core.prompt_rows import Message, load_prompts
from self_model.core.rows import MAX_SHOWN, length_stats
from self_model.template.resolve import Template


@dataclass
class PromptReport:
    """What loading did to the prompts: reported before training and saved in the run folder."""

    rows: int = 0
    dropped_too_long: int = 0
    max_prompt_length: int = 0
    policy: str = "error"
    lengths: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"rows_in": self.rows, "prompts_out": len(self.lengths), "max_prompt_length": self.max_prompt_length,
                "prompt_truncation": self.policy, "dropped_too_long": self.dropped_too_long,
                "prompt_tokens": length_stats(self.lengths)}


def prompt_length(tokenizer: Any, template: Template, messages: list[Message]) -> int:
    """Tokens of the prompt as rendered for generation (template, generation prompt included)."""
    return len(template.prompt_ids(tokenizer, messages))


def build_prompts(files: str | list[str], tokenizer: Any, template: Template, ppo: Any,
                  limit: int | None = None) -> tuple[list[dict[str, Any]], PromptReport]:
    """Load, validate and measure the prompts (of `files`, or the mix of `ppo.datasets`: core.dataset_mix logs the
    plan); apply `prompt_truncation` to those over `max_prompt_length`."""
    rows = load_prompts(files, ppo.system_prompt) if files else mix_sources(
        sources(ppo.datasets or [], ppo.dataset_registry), lambda src: load_prompts(src.files, ppo.system_prompt),
        ppo.mix, ppo.mix_seed)[0]
    if limit:
        rows = rows[:limit]
    report = PromptReport(rows=len(rows), max_prompt_length=ppo.max_prompt_length, policy=ppo.prompt_truncation)
    problems = [f"{row['source']}: {reason}" for row in rows
                if (reason := template.check_roles(row["messages"]))]
    if problems:
        raise DataError(problems[:MAX_SHOWN], total=len(problems))
    kept, too_long = [], []
    for row in rows:
        n = prompt_length(tokenizer, template, row["messages"])
        if n > ppo.max_prompt_length:
            too_long.append(f"{row['source']} ({n} tokens)")
            continue
        report.lengths.append(n)
        kept.append(row)
    if too_long and ppo.prompt_truncation == "error":
        raise DataError(too_long[:MAX_SHOWN], total=len(too_long),
                        hint=f"{len(too_long)} of {len(rows)} prompts are longer than ppo.max_prompt_length = "
                        f"{ppo.max_prompt_length} tokens (chat template included). Raise max_prompt_length, or set "
                        "ppo.prompt_truncation: drop to leave them out (they are counted).")
    report.dropped_too_long = len(too_long)
    if not kept:
        raise UserError(f"no prompts left in {files}: {report.summary()}")
    return kept, report


def check_enough_prompts(rows: list[dict[str, Any]], ppo: Any) -> None:
    """A step takes train_batch_size prompts: with fewer, an epoch would have no step at all."""
    if len(rows) < ppo.train_batch_size:
        data = ppo.train_file or [d.name for d in ppo.datasets or []]
        raise UserError(f"ppo.train_batch_size is {ppo.train_batch_size} prompts per step, but {data} has "
                        f"{len(rows)} usable prompts: an epoch would have no step. Add prompts or lower "
                        "train_batch_size (and ppo_mini_batch_size with it).")


def load_prompt_data(cfg: Any) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any]]:
    """Tokenizer, template-rendered train (and eval) prompts and their report: what both backends start from."""
    from self_model.core.modeling import load_tokenizer
    from self_model.template.resolve import resolve_template

    ppo = cfg.ppo
    tokenizer = load_tokenizer(cfg)
    template = resolve_template(cfg, tokenizer)
    train, report = build_prompts(ppo.train_file, tokenizer, template, ppo, ppo.max_samples)
    check_enough_prompts(train, ppo)
    eval_, eval_report = build_prompts(ppo.eval_file, tokenizer, template, ppo) if ppo.eval_file else (None, None)
    data = {"train": report.summary(), **({"eval": eval_report.summary()} if eval_report else {})}
    return (tokenizer, template), train, eval_, data


# ---- the two backends' formats ----------------------------------------------------------------------------------
def verl_rows(rows: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """verl's RL dataset schema: data_source, prompt (chat messages), ability, reward_model, extra_info."""
    return [{"data_source": row["data_source"], "prompt": row["messages"], "ability": row["ability"],
             "reward_model": {"style": "rule", "ground_truth": row["ground_truth"]},
             "extra_info": {"split": split, "index": i, "source": row["source"], **row["extra_info"]}}
            for i, row in enumerate(rows)]


def write_parquet(rows: list[dict[str, Any]], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError([f"cannot write {path}: {exc}"], hint="Give 'extra_info' the same keys and value types in "
                        "every row.") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def trl_dataset(rows: list[dict[str, Any]]) -> Any:
    """trl GRPO rows: a conversational prompt plus the columns trl hands to every reward function."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": row["messages"], "ground_truth": row["ground_truth"],
                               "data_source": row["data_source"],
                               "extra_info": json.dumps({"source": row["source"], **row["extra_info"]},
                                                        ensure_ascii=False)} for row in rows])
