"""Preference data for DPO: read rows, convert them to (prompt, chosen, rejected), tokenize exactly as SFT does.

Canonical pair: `{"prompt": [messages ending on a user / tool turn], "chosen": {"role": "assistant", ...},
"rejected": {"role": "assistant", ...}, "format": name, "source": "file:line"}`. A preference format is a small
converter registered by name (see `register_preference_format`); `format: auto` detects each row's format
from its keys and refuses a file that mixes formats.

Tokenization renders `prompt + [reply]` with the chat template as SFT renders a conversation whose last turn
is trained (`mask_history`): the prompt ids are everything before the trained span, the reply ids are the
trained span (the reply and its end-of-turn token, so the model learns to stop). The ids of prompt + chosen are
therefore exactly the ids SFT trains on for that conversation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from self_model.core.config import did_you_mean
from self_model.core.conversations import (
    MAX_SHOWN,
    SHAREGPT_ROLES,
    RowError,
    get_format,
    iter_rows,
    row_tools,
    validate_conversation,
)
from self_model.core.errors import DataError, UserError
from self_model.core.registry import Registry
from self_model.rlhf.config import DPODataConfig
from self_model.template.chat_template import IGNORE_INDEX
from self_model.template.resolve import Template

Message = dict[str, Any]
Pair = tuple[list[Message], Message, Message]
TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


@dataclass(frozen=True)
class PreferenceFormat:
    name: str
    detect: Callable[[dict[str, Any]], bool]
    convert: Callable[[dict[str, Any]], Pair]
    example: str


FORMATS: Registry[PreferenceFormat] = Registry("preference format")


def register_preference_format(fmt: PreferenceFormat) -> PreferenceFormat:
    return FORMATS.register(fmt.name, fmt)


def known_preference_formats() -> list[str]:
    return FORMATS.names()


def _message(obj: Any, where: str) -> Message:
    """A ShareGPT turn {"from", "value"} or an OpenAI message {"role", "content"} as a message."""
    if isinstance(obj, dict) and "from" in obj and "value" in obj:
        speaker = obj["from"]
        if speaker not in SHAREGPT_ROLES:
            raise RowError(f"{where} has from={speaker!r}; expected one of {sorted(set(SHAREGPT_ROLES))}"
                           f"{did_you_mean(str(speaker), SHAREGPT_ROLES)}")
        role, content = SHAREGPT_ROLES[speaker], obj["value"]
    elif isinstance(obj, dict) and "role" in obj:
        role, content = obj["role"], obj.get("content")
        content = "" if content is None else content
    else:
        raise RowError(f"{where} must be a string, a {{from, value}} turn or a {{role, content}} message, "
                       f"got {json.dumps(obj, ensure_ascii=False)[:80]}")
    if not isinstance(content, str):
        raise RowError(f"{where}: the text must be a string, got {type(content).__name__}")
    return {"role": role, "content": content}


def _reply(row: dict[str, Any], key: str) -> Message:
    """`chosen` / `rejected`: a string, one turn object, or a list holding one assistant turn."""
    if key not in row:
        what = "preferred" if key == "chosen" else "dispreferred"
        raise RowError(f"the row has no '{key}' (the {what} reply); a preference row needs both 'chosen' and "
                       f"'rejected' (keys present: {sorted(row)})")
    value = row[key]
    if isinstance(value, list):
        if len(value) != 1:
            raise RowError(f"'{key}' is a list of {len(value)} messages; expected the one assistant reply (put "
                           "earlier turns into the prompt)")
        value = value[0]
    message = {"role": "assistant", "content": value} if isinstance(value, str) else _message(value, f"'{key}'")
    if message["role"] != "assistant":
        raise RowError(f"'{key}' is a '{message['role']}' turn; expected the assistant's reply")
    if not message["content"].strip():
        raise RowError(f"'{key}' is empty")
    return message


def _from_conversation(name: str) -> Callable[[dict[str, Any]], Pair]:
    """ShareGPT `conversations` / OpenAI `messages` prompt (the SFT converters), replies in chosen / rejected."""
    def convert(row: dict[str, Any]) -> Pair:
        return get_format(name).convert(row), _reply(row, "chosen"), _reply(row, "rejected")

    return convert


def _from_prompt(row: dict[str, Any]) -> Pair:
    prompt = row["prompt"]
    messages: list[Message] = []
    if isinstance(prompt, str):
        if row.get("system"):
            messages.append({"role": "system", "content": str(row["system"])})
        messages.append({"role": "user", "content": prompt})
    elif isinstance(prompt, list):
        messages = [_message(m, f"prompt message {i}") for i, m in enumerate(prompt, 1)]
    else:
        raise RowError(f"'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    return messages, _reply(row, "chosen"), _reply(row, "rejected")


def _from_implicit(row: dict[str, Any]) -> Pair:
    """TRL's implicit prompt: chosen and rejected are whole conversations sharing every turn but the last."""
    chosen = [_message(m, f"chosen message {i}") for i, m in enumerate(row["chosen"], 1)]
    rejected = [_message(m, f"rejected message {i}") for i, m in enumerate(row["rejected"], 1)]
    if len(chosen) != len(rejected) or chosen[:-1] != rejected[:-1]:
        raise RowError("'chosen' and 'rejected' are conversations that differ before their last turn; they must "
                       "share the prompt and differ only in the final assistant reply")
    return chosen[:-1], _reply({"chosen": chosen[-1:]}, "chosen"), _reply({"rejected": rejected[-1:]}, "rejected")


register_preference_format(PreferenceFormat(
    "sharegpt", lambda r: "conversations" in r, _from_conversation("sharegpt"),
    '{"conversations": [{"from": "human", "value": "..."}], "chosen": "...", "rejected": "..."}'))
register_preference_format(PreferenceFormat(
    "messages", lambda r: "messages" in r, _from_conversation("messages"),
    '{"messages": [{"role": "user", "content": "..."}], "chosen": {"role": "assistant", "content": "..."}, '
    '"rejected": {...}}'))
register_preference_format(PreferenceFormat(
    "prompt", lambda r: "prompt" in r, _from_prompt,
    '{"prompt": "..." or [messages], "chosen": "..." or [assistant message], "rejected": ...}'))
register_preference_format(PreferenceFormat(
    "implicit", lambda r: isinstance(r.get("chosen"), list) and isinstance(r.get("rejected"), list)
    and len(r["chosen"]) > 1, _from_implicit,
    '{"chosen": [user, assistant messages], "rejected": [same user message, other assistant message]}'))


def detect_preference_format(row: dict[str, Any]) -> str:
    for fmt in FORMATS:
        if fmt.detect(row):
            return fmt.name
    examples = "\n".join(f"    {f.name}: {f.example}" for f in FORMATS)
    raise RowError(f"unrecognised preference row with keys {sorted(row)}; expected one of:\n{examples}")


def check_pair(prompt: list[Message], chosen: Message, check: Callable[[list[Message], Any], str | None] | None = None,
               tools: list[Any] | None = None) -> None:
    """The prompt has a non-empty last user turn, the roles are in order, and the template can express them."""
    asked = [m for m in prompt if m["role"] != "system"]
    if not asked:
        raise RowError("the prompt is empty: it has no user turn")
    if asked[-1]["role"] == "user" and not asked[-1]["content"].strip():
        raise RowError("the prompt is empty: its last user turn has no text")
    validate_conversation(prompt + [chosen])
    if check and (reason := check(prompt + [chosen], tools)):
        raise RowError(reason)


def load_preference_pairs(paths: str | list[str], fmt: str = "auto",
                          check: Callable[[list[Message], Any], str | None] | None = None,
                          drop_identical: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Read, convert and validate every row; return the pairs and the locations of identical pairs dropped.

    Bad rows raise one DataError listing the first problems with file:line. Identical chosen and rejected
    replies are an error too (counted, first locations shown) unless `drop_identical`.
    """
    pairs: list[dict[str, Any]] = []
    problems: list[str] = []
    identical: list[str] = []
    bad = 0
    if fmt != "auto":
        FORMATS.get(fmt, extra_choices=("auto",))  # an unknown name fails here, listing the known ones
    for path in [paths] if isinstance(paths, str) else paths:
        file_format, first_loc, seen = None, None, 0
        for loc, row in iter_rows(path):
            seen += 1
            try:
                if isinstance(row, RowError):
                    raise row
                name = detect_preference_format(row) if fmt == "auto" else fmt
                if first_loc is None:
                    file_format, first_loc = name, loc
                elif name != file_format:
                    raise RowError(f"row is '{name}' but {first_loc} is '{file_format}'; one file holds one format")
                prompt, chosen, rejected = FORMATS[name].convert(row)
                tools = row_tools(row)
                check_pair(prompt, chosen, check, tools)
                if chosen == rejected:
                    identical.append(loc)
                    continue
                pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "format": name,
                              "source": loc, "tools": tools})
            except (RowError, KeyError) as exc:
                bad += 1
                if len(problems) < MAX_SHOWN:
                    problems.append(f"{loc}: {exc}")
        if not seen:
            problems.append(f"{path}: no rows (the file is empty)")
            bad += 1
    if problems:
        raise DataError(problems, total=bad, hint="Fix these rows (nothing was trained).")
    if identical and not drop_identical:
        shown = ", ".join(identical[:MAX_SHOWN]) + (" ..." if len(identical) > MAX_SHOWN else "")
        raise DataError([f"{len(identical)} pair(s) have identical chosen and rejected replies, so they teach "
                         f"nothing: {shown}"], hint="Remove them, or set data.drop_identical: true to drop them "
                        "(the count is reported).")
    return pairs, identical


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
        def stats(values: list[int]) -> dict[str, Any]:
            v = sorted(values) or [0]
            return {"min": v[0], "mean": round(sum(v) / len(v), 1), "p95": v[min(len(v) - 1, int(0.95 * len(v)))],
                    "max": v[-1]}

        return {"rows_in": self.rows, "pairs_out": len(self.pair_lengths), "max_length": self.max_length,
                "truncation": self.truncation, "truncated": self.truncated, "dropped_too_long": self.dropped_too_long,
                "dropped_prompt_fills_max_length": self.dropped_prompt_fills_max_length,
                "identical_dropped": self.identical_dropped,
                "identical_after_truncation": self.identical_after_truncation,
                "prompt_tokens": stats(self.prompt_lengths),
                "prompt_plus_longer_reply_tokens": stats(self.pair_lengths)}


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


def build_preference_dataset(files: str | list[str], tokenizer: Any, template: Template,
                             data: DPODataConfig, limit: int | None = None) -> tuple[Any, PreferenceReport]:
    """Load, validate and tokenize preference pairs into a dataset of prompt_ids / chosen_ids / rejected_ids."""
    from datasets import Dataset

    check = template.check_roles
    pairs, identical = load_preference_pairs(files, data.format, check, data.drop_identical)
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
