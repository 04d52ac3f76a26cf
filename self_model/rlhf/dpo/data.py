"""Preference data for DPO: pairs read by core.preferences, tokenized exactly as SFT renders a conversation.

Tokenization renders `prompt + [reply]` with the chat template as SFT renders a conversation whose last turn
is trained (`mask_history`): the prompt ids are everything before the trained span, the reply ids are the
trained span (the reply and its end-of-turn token, so the model learns to stop). The ids of prompt + chosen are
therefore exactly the ids SFT trains on for that conversation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from self_model.core.dataset_mix import mix_sources, sources
from self_model.core.errors import DataError, UserError
from self_model.core.preferences import load_preference_pairs
from self_model.core.rows import MAX_SHOWN, RowError, length_stats
from self_model.rlhf.config import DPODataConfig
from self_model.template.chat_template import IGNORE_INDEX
from self_model.template.resolve import Template

TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


# ---- tokenization ----------------------------------------------------------------------------------------
def _split(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids): the reply is the trained span (its labels), the prompt everything before it."""
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not trained or trained != list(range(trained[0], trained[-1] + 1)):
        raise RowError("the template marks no single trained span for the last reply")
    return ids[: trained[0]], labels[trained[0]: trained[-1] + 1]


def encode_pair(tokenizer: Any, template: Template, pair: dict[str, Any]) -> tuple[list[int], ...]:
    """(prompt_ids, chosen_ids, rejected_ids) exactly as SFT tokenizes prompt + reply."""
    prompt, tools = pair["prompt"], pair.get("tools")
    prompt_c, chosen = _split(*template.encode(tokenizer, prompt + [pair["chosen"]], True, tools))
    prompt_r, rejected = _split(*template.encode(tokenizer, prompt + [pair["rejected"]], True, tools))
    if prompt_c != prompt_r:
        raise RowError("the prompt tokenizes differently in front of the chosen and the rejected reply (a token "
                       "merges across the boundary); check the template's generation prompt")
    return prompt_c, chosen, rejected


@dataclass
class PreferenceReport:
    """What loading and tokenization did to the pairs: reported before training and saved with the result."""

    rows: int = 0
    identical_dropped: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_prompt_fills_max_length: int = 0
    identical_after_truncation: int = 0
    prompt_lengths: list[int] = field(default_factory=list)
    pair_lengths: list[int] = field(default_factory=list)
    truncation: str = "truncate"
    max_length: int = 0
    # The first pair of each format, for --dry-run (not part of the summary).
    examples: dict[str, dict[str, Any]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"rows_in": self.rows, "pairs_out": len(self.pair_lengths), "max_length": self.max_length,
                "truncation": self.truncation, "truncated": self.truncated, "dropped_too_long": self.dropped_too_long,
                "dropped_prompt_fills_max_length": self.dropped_prompt_fills_max_length,
                "identical_dropped": self.identical_dropped,
                "identical_after_truncation": self.identical_after_truncation,
                "prompt_tokens": length_stats(self.prompt_lengths),
                "prompt_plus_longer_reply_tokens": length_stats(self.pair_lengths)}


def apply_length_policy(encoded: list[tuple[list[int], ...]], data: DPODataConfig,
                        report: PreferenceReport) -> list[dict[str, list[int]]]:
    """Cut (or drop) pairs whose prompt + reply exceeds max_length; a prompt that fills it leaves nothing to train."""
    rows = []
    for prompt, chosen, rejected in encoded:
        room = data.max_length - len(prompt)
        if room <= 0:
            report.dropped_prompt_fills_max_length += 1
            continue
        if max(len(chosen), len(rejected)) > room:
            if data.truncation == "drop":
                report.dropped_too_long += 1
                continue
            report.truncated += 1  # keep the start: the end of the longer reply (and its end-of-turn) is cut
            chosen, rejected = chosen[:room], rejected[:room]
            if chosen == rejected:
                report.identical_after_truncation += 1
                continue
        report.prompt_lengths.append(len(prompt))
        report.pair_lengths.append(len(prompt) + max(len(chosen), len(rejected)))
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return rows


def read_pairs(files: str | list[str] | None, data: DPODataConfig, check: Any,
               stage: str = "DPO") -> tuple[list[dict[str, Any]], list[str]]:
    """The pairs of `files`, or the mix of `data.datasets` (each in its registry format; core.dataset_mix logs the
    plan); and the identical pairs dropped."""
    if files:
        return load_preference_pairs(files, data.format, check, data.drop_identical, stage)
    identical: list[str] = []

    def read(src: Any) -> list[dict[str, Any]]:
        fmt = src.entry.format if src.entry.format != "auto" else data.format
        pairs, same = load_preference_pairs(src.files, fmt, check, data.drop_identical, stage)
        identical.extend(same)
        return pairs

    pairs, _ = mix_sources(sources(data.datasets or [], data.dataset_registry), read, data.mix, data.mix_seed)
    return pairs, identical


def build_preference_dataset(files: str | list[str] | None, tokenizer: Any, template: Template,
                             data: DPODataConfig, limit: int | None = None,
                             stage: str = "DPO") -> tuple[Any, PreferenceReport]:
    """Load, validate and tokenize preference pairs into a dataset of prompt_ids / chosen_ids / rejected_ids.
    `stage` names the trainer in refusals (the reward model, ORPO and SimPO read pairs here too)."""
    from datasets import Dataset

    pairs, identical = read_pairs(files, data, template.check_roles, stage)
    if limit:
        pairs = pairs[:limit]
    report = PreferenceReport(rows=len(pairs) + len(identical), identical_dropped=len(identical),
                              truncation=data.truncation, max_length=data.max_length)
    encoded, problems = [], []
    for pair in pairs:
        try:
            encoded.append(encode_pair(tokenizer, template, pair))
        except RowError as exc:
            problems.append(f"{pair['source']}: {exc}")
    if problems:
        raise DataError(problems[:MAX_SHOWN], total=len(problems))
    rows = apply_length_policy(encoded, data, report)
    if not rows:
        raise UserError(f"no trainable pairs left in {files}: {report.summary()}")
    for pair in pairs:
        report.examples.setdefault(pair["format"], pair)
    return Dataset.from_list(rows), report
