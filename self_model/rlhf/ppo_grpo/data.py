"""Prompt data for PPO / GRPO: a prompt (chat messages) and the reference answer that a reward checks.

Rows, one JSON object a line (`.jsonl`) or a JSON array (`.json`):

    {"question": "...", "answer": "..."}                                   MedicalGPT's grpo_sample.jsonl
    {"prompt": "..." or [messages], "ground_truth": "..."}                 ("answer" works too)
    {"messages": [... ending on a user turn], "ground_truth": "..."}       (or ending on the reference reply)

Optional keys: "system", "data_source" (default: the file's name), "ability", "extra_info" (an object passed to the
rewards). Every prompt is measured with the chat template exactly as it will be rendered for generation; prompts over
`max_prompt_length` stop the run (`prompt_truncation: error`) or are dropped and counted (`drop`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from self_model.core.conversations import MAX_SHOWN, RowError, iter_rows, validate_conversation
from self_model.core.errors import DataError, UserError
from self_model.template.resolve import Template

Message = dict[str, Any]
ROW_SHAPES = ('{"question": "...", "answer": "..."}', '{"prompt": "..." or [messages], "ground_truth": "..."}',
              '{"messages": [..., {"role": "user", ...}], "ground_truth": "..."}')


def _messages(value: Any, key: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise RowError(f"'{key}' must be a non-empty list of {{role, content}} messages")
    out = []
    for i, msg in enumerate(value, 1):
        if not isinstance(msg, dict) or "role" not in msg or not isinstance(msg.get("content", ""), str):
            raise RowError(f"'{key}' message {i} must be an object with a 'role' and a string 'content'")
        out.append({"role": msg["role"], "content": msg.get("content") or ""})
    return out


def _answer(row: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        if key in row:
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise RowError(f"'{key}' must be a string (or a number), got {type(value).__name__}")
            if not str(value).strip():
                raise RowError(f"'{key}' is empty: a reward has nothing to check the reply against")
            return str(value)
    return None


def convert_row(row: dict[str, Any], system_prompt: str | None) -> tuple[list[Message], str]:
    """(prompt messages, ground truth) of one row, or RowError saying what is wrong."""
    if "question" in row:
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise RowError("'question' must be a non-empty string")
        prompt, truth = [{"role": "user", "content": row["question"]}], _answer(row, ("answer", "ground_truth"))
    elif "prompt" in row:
        value = row["prompt"]
        prompt = [{"role": "user", "content": value}] if isinstance(value, str) else _messages(value, "prompt")
        truth = _answer(row, ("ground_truth", "answer"))
    elif "messages" in row:
        prompt, truth = _messages(row["messages"], "messages"), _answer(row, ("ground_truth", "answer"))
        if prompt[-1]["role"] == "assistant":
            if truth is not None:
                raise RowError("'messages' ends with an assistant turn and the row has a ground_truth too; a prompt "
                               "ends on a user turn (or leave out ground_truth to use that reply as the answer)")
            truth, prompt = prompt[-1]["content"], prompt[:-1]
    else:
        raise RowError(f"unrecognised prompt row with keys {sorted(row)}; expected one of: " + " | ".join(ROW_SHAPES))
    if truth is None:
        raise RowError(f"the row has no reference answer: add 'ground_truth' or 'answer' (keys: {sorted(row)})")
    system = row.get("system") or system_prompt
    if system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": str(system)}, *prompt]
    if not prompt or prompt[-1]["role"] != "user" or not prompt[-1]["content"].strip():
        raise RowError("the prompt must end with a non-empty user turn")
    validate_conversation([*prompt, {"role": "assistant", "content": "-"}])
    return prompt, truth


@dataclass
class PromptReport:
    """What loading did to the prompts: reported before training and saved in the run folder."""

    rows: int = 0
    dropped_too_long: int = 0
    max_prompt_length: int = 0
    policy: str = "error"
    lengths: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        v = sorted(self.lengths) or [0]
        return {"rows_in": self.rows, "prompts_out": len(self.lengths), "max_prompt_length": self.max_prompt_length,
                "prompt_truncation": self.policy, "dropped_too_long": self.dropped_too_long,
                "prompt_tokens": {"min": v[0], "mean": round(sum(v) / len(v), 1),
                                  "p95": v[min(len(v) - 1, int(0.95 * len(v)))], "max": v[-1]}}


def load_prompts(paths: str | list[str], system_prompt: str | None = None) -> list[dict[str, Any]]:
    """Every row as {messages, ground_truth, data_source, ability, extra_info, source}; one DataError for bad rows."""
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    bad = 0
    for path in [paths] if isinstance(paths, str) else paths:
        seen = 0
        for loc, row in iter_rows(path):
            seen += 1
            try:
                if isinstance(row, RowError):
                    raise row
                messages, truth = convert_row(row, system_prompt)
                extra = row.get("extra_info", {})
                if not isinstance(extra, dict):
                    raise RowError(f"'extra_info' must be an object, got {type(extra).__name__}")
                rows.append({"messages": messages, "ground_truth": truth, "source": loc, "extra_info": extra,
                             "data_source": str(row.get("data_source") or Path(path).stem),
                             "ability": str(row.get("ability") or "qa")})
            except RowError as exc:
                bad += 1
                if len(problems) < MAX_SHOWN:
                    problems.append(f"{loc}: {exc}")
        if not seen:
            bad += 1
            problems.append(f"{path}: no rows (the file is empty)")
    if problems:
        raise DataError(problems, total=bad, hint="Fix these rows (nothing was trained).")
    return rows


def prompt_length(tokenizer: Any, template: Template, messages: list[Message]) -> int:
    """Tokens of the prompt as rendered for generation (template, generation prompt included)."""
    return len(template.prompt_ids(tokenizer, messages))


def build_prompts(files: str | list[str], tokenizer: Any, template: Template, ppo: Any,
                  limit: int | None = None) -> tuple[list[dict[str, Any]], PromptReport]:
    """Load, validate and measure the prompts; apply `prompt_truncation` to those over `max_prompt_length`."""
    rows = load_prompts(files, ppo.system_prompt)
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
        raise UserError(f"ppo.train_batch_size is {ppo.train_batch_size} prompts per step, but {ppo.train_file} has "
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
