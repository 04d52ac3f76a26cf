"""Data for KTO, ORPO and SimPO, tokenized exactly as SFT renders a conversation whose last reply is trained.

ORPO / SimPO read preference pairs through DPO's reader (`rlhf.dpo.data`: the same formats, checks, length policy).
KTO reads unpaired rows, each one reply marked desirable or not:
    {"messages": [..., {"role": "assistant", ...}], "label": true}          (LLaMA-Factory's kto_en_demo, OpenAI)
    {"conversations": [..., {"from": "gpt", ...}], "kto_tag": false}        (LLaMA-Factory sharegpt)
    {"prompt": "..." or [messages], "completion": "..." or [message], "label": true}   (trl's unpaired preference)
and preference pairs, each split into its chosen reply (desirable) and its rejected reply (undesirable).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from self_model.core.conversations import detect_format, get_format, row_tools, validate_conversation
from self_model.core.dataset_mix import mix_sources, sources
from self_model.core.errors import DataError, UserError
from self_model.core.preferences import FORMATS as PAIR_FORMATS
from self_model.core.preferences import check_pair, detect_preference_format
from self_model.core.rows import MAX_SHOWN, OneFormatPerFile, RowError, length_stats, read_rows
from self_model.rlhf.config import DPODataConfig
from self_model.template.chat_template import IGNORE_INDEX
from self_model.template.resolve import Template

KTO_KEYS = ("label", "kto_tag")
Message = dict[str, Any]


# ---- reading KTO rows ------------------------------------------------------------------------------------------
def _unpaired(row: dict[str, Any], key: str) -> tuple[list[Message], Message]:
    """(prompt, reply) of a row marked with `key`."""
    if "completion" in row:
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        completion = row["completion"]
        reply = completion[0] if isinstance(completion, list) and len(completion) == 1 else completion
        reply = {"role": "assistant", "content": reply} if isinstance(reply, str) else reply
        if not isinstance(prompt, list) or not isinstance(reply, dict):
            raise RowError("'prompt' must be a string or a list of messages and 'completion' a string or one "
                           "assistant message")
        messages = [{"role": m.get("role"), "content": m.get("content", "")} for m in [*prompt, reply]]
    else:
        fields = {k: v for k, v in row.items() if k not in KTO_KEYS}
        messages = get_format(detect_format(fields)).convert(fields)
    validate_conversation(messages)  # ends on the assistant's reply, roles in order
    return messages[:-1], messages[-1]


def load_kto_rows(paths: str | list[str], check: Any) -> list[dict[str, Any]]:
    """Every row as {prompt, reply, label, source, tools}; a pair gives two rows. Bad rows: one DataError."""
    one_format = OneFormatPerFile()

    def convert(row: dict[str, Any], loc: str, path: Path) -> list[dict[str, Any]]:
        key = next((k for k in KTO_KEYS if k in row), None)
        tools = row_tools(row)
        if key is not None:
            if not isinstance(row[key], bool):
                raise RowError(f"'{key}' must be true (a desirable reply) or false (an undesirable one), got "
                               f"{row[key]!r}")
            one_format.check(path, "kto (unpaired)", loc)
            prompt, reply = _unpaired(row, key)
            examples = [(reply, row[key])]
        else:
            name = detect_preference_format(row)
            one_format.check(path, f"{name} (pairs, split)", loc)
            prompt, chosen, rejected = PAIR_FORMATS[name].convert(row)
            examples = [(chosen, True), (rejected, False)]
        for reply, _ in examples:
            check_pair(prompt, reply, check, tools)
        return [{"prompt": prompt, "reply": reply, "label": label, "source": loc, "tools": tools}
                for reply, label in examples]

    nested = read_rows(paths, convert, hint="Fix these rows (nothing was trained).")
    return [example for row in nested for example in row]


# ---- tokenization ------------------------------------------------------------------------------------------------
def encode_reply(tokenizer: Any, template: Template, example: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) exactly as SFT tokenizes prompt + reply: the reply is the trained span (with its
    end-of-turn token, so the model learns to stop), the prompt everything before it."""
    ids, labels = template.encode(tokenizer, example["prompt"] + [example["reply"]], True, example["tools"])
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not trained or trained != list(range(trained[0], trained[-1] + 1)):
        raise RowError("the template marks no single trained span for the last reply")
    return ids[: trained[0]], ids[trained[0]: trained[-1] + 1]


@dataclass
class KTOReport:
    """What loading and the length policy did to the KTO rows (reported before training, saved with the result)."""

    rows: int = 0
    desirable: int = 0
    undesirable: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_prompt_fills_max_length: int = 0
    lengths: list[int] = field(default_factory=list)
    truncation: str = "truncate"
    max_length: int = 0
    example: dict[str, Any] | None = None  # the first row, for --dry-run

    def summary(self) -> dict[str, Any]:
        return {"examples_in": self.rows, "examples_out": len(self.lengths), "desirable": self.desirable,
                "undesirable": self.undesirable, "max_length": self.max_length, "truncation": self.truncation,
                "truncated": self.truncated, "dropped_too_long": self.dropped_too_long,
                "dropped_prompt_fills_max_length": self.dropped_prompt_fills_max_length,
                "prompt_plus_reply_tokens": length_stats(self.lengths)}


def build_kto_dataset(files: str | list[str] | None, tokenizer: Any, template: Template, data: DPODataConfig,
                      limit: int | None = None) -> tuple[Any, KTOReport]:
    """KTO rows (of `files`, or the mix of `data.datasets`: core.dataset_mix logs the plan) tokenized into
    prompt_ids / completion_ids / label, with DPO's length policy (counted)."""
    from datasets import Dataset

    if files:
        examples = load_kto_rows(files, template.check_roles)
    else:  # each data set gives its rows (a pair: two), mixed row by row
        examples, _ = mix_sources(sources(data.datasets or [], data.dataset_registry),
                                  lambda src: load_kto_rows(src.files, template.check_roles), data.mix, data.mix_seed)
    if limit:
        examples = examples[:limit]
    report = KTOReport(rows=len(examples), truncation=data.truncation, max_length=data.max_length,
                       example=examples[0] if examples else None)
    rows, problems = [], []
    for example in examples:
        try:
            prompt, reply = encode_reply(tokenizer, template, example)
        except RowError as exc:
            problems.append(f"{example['source']}: {exc}")
            continue
        room = data.max_length - len(prompt)
        if room <= 0:
            report.dropped_prompt_fills_max_length += 1
            continue
        if len(reply) > room:
            if data.truncation == "drop":
                report.dropped_too_long += 1
                continue
            report.truncated += 1
            reply = reply[:room]
        report.lengths.append(len(prompt) + len(reply))
        report.desirable += example["label"]
        report.undesirable += not example["label"]
        rows.append({"prompt_ids": prompt, "completion_ids": reply, "label": example["label"]})
    if problems:
        raise DataError(problems[:MAX_SHOWN], total=len(problems))
    if not rows:
        raise UserError(f"no trainable rows left in {files}: {report.summary()}")
    if not report.desirable or not report.undesirable:
        raise UserError(f"{files}: KTO needs desirable and undesirable replies; got {report.desirable} desirable and "
                        f"{report.undesirable} undesirable (label: true / false)")
    return Dataset.from_list(rows), report
