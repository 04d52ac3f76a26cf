"""Preference pairs (a prompt, a chosen and a rejected reply): the row formats, pair validation and reading.

Shared by everything that reads preference data: DPO (self_model/rlhf/dpo), and data_process, which must accept
exactly the rows the trainers accept. Canonical pair: `{"prompt": [messages ending on a user / tool turn],
"chosen": {"role": "assistant", ...}, "rejected": {"role": "assistant", ...}, "format": name, "source": "file:line",
"tools": [...] | None}`. A preference format is a small converter registered by name (`register_preference_format`);
`format: auto` detects each row's format from its keys and refuses a file that mixes formats.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from self_model.core.config import did_you_mean
from self_model.core.conversations import (
    SHAREGPT_ROLES,
    get_format,
    parse_tool_calls,
    refuse_kto_row,
    row_tools,
    tool_call,
    validate_conversation,
)
from self_model.core.errors import DataError
from self_model.core.registry import Registry
from self_model.core.rows import MAX_SHOWN, OneFormatPerFile, RowError, read_rows

Message = dict[str, Any]
Pair = tuple[list[Message], Message, Message]


@dataclass(frozen=True)
class PreferenceFormat:
    name: str
    detect: Callable[[dict[str, Any]], bool]
    convert: Callable[[dict[str, Any]], Pair]
    example: str


FORMATS: Registry[PreferenceFormat] = Registry("preference format")


def register_preference_format(fmt: PreferenceFormat) -> PreferenceFormat:
    return FORMATS.register(fmt.name, fmt)


def _message(obj: Any, where: str) -> Message:
    """A ShareGPT turn {"from", "value"} or an OpenAI message {"role", "content"} as a message; tool calls kept
    (a ShareGPT function_call turn, or OpenAI tool_calls), as the SFT converters keep them."""
    if isinstance(obj, dict) and "from" in obj and "value" in obj:
        speaker = obj["from"]
        if speaker not in SHAREGPT_ROLES:
            raise RowError(f"{where} has from={speaker!r}; expected one of {sorted(set(SHAREGPT_ROLES))}"
                           f"{did_you_mean(str(speaker), SHAREGPT_ROLES)}")
        if speaker == "function_call" and isinstance(obj["value"], str):
            return {"role": "assistant", "content": "", "tool_calls": parse_tool_calls(obj["value"], where)}
        role, content, calls = SHAREGPT_ROLES[speaker], obj["value"], None
    elif isinstance(obj, dict) and "role" in obj:
        role, content, calls = obj["role"], obj.get("content"), obj.get("tool_calls")
        content = "" if content is None else content
    else:
        raise RowError(f"{where} must be a string, a {{from, value}} turn or a {{role, content}} message, "
                       f"got {json.dumps(obj, ensure_ascii=False)[:80]}")
    if not isinstance(content, str):
        raise RowError(f"{where}: the text must be a string, got {type(content).__name__}")
    message = {"role": role, "content": content}
    if calls:
        if not isinstance(calls, list):
            raise RowError(f"{where}: 'tool_calls' must be a list")
        message["tool_calls"] = [tool_call(c, where) for c in calls]
    return message


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
    if not message["content"].strip() and not message.get("tool_calls"):
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
    return FORMATS.detect(row, "preference row")


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
                          drop_identical: bool = False, stage: str = "DPO") -> tuple[list[dict[str, Any]], list[str]]:
    """Read, convert and validate every row; return the pairs and the locations of identical pairs dropped.

    `stage` names the trainer in the refusal of KTO rows (DPO, ORPO, SimPO, the reward model).

    Bad rows raise one DataError listing the first problems with file:line. Identical chosen and rejected
    replies are an error too (counted, first locations shown) unless `drop_identical`.
    """
    identical: list[str] = []
    if fmt != "auto":
        FORMATS.get(fmt, extra_choices=("auto",))  # an unknown name fails here, listing the known ones
    one_format = OneFormatPerFile()

    def convert(row: dict[str, Any], loc: str, path: Path) -> dict[str, Any] | None:
        refuse_kto_row(row, stage)
        name = detect_preference_format(row) if fmt == "auto" else fmt
        one_format.check(path, name, loc)
        prompt, chosen, rejected = FORMATS[name].convert(row)
        tools = row_tools(row)
        check_pair(prompt, chosen, check, tools)
        if chosen == rejected:
            identical.append(loc)  # counted and refused below (or dropped with data.drop_identical)
            return None
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "format": name, "source": loc,
                "tools": tools}

    pairs = read_rows(paths, convert)
    if identical and not drop_identical:
        shown = ", ".join(identical[:MAX_SHOWN]) + (" ..." if len(identical) > MAX_SHOWN else "")
        raise DataError([f"{len(identical)} pair(s) have identical chosen and rejected replies, so they teach "
                         f"nothing: {shown}"], hint="Remove them, or set data.drop_identical: true to drop them "
                        "(the count is reported).")
    return pairs, identical


