"""Detect a row's format and convert it to the canonical record its training stage reads.

The readers and converters are the trainers' own (self_model.core), so this tool accepts exactly the rows the
trainers accept and refuses the others with the trainers' messages; and every cleaned record is read back with
the trainer's converter before it is kept (`check_structure`), so what is written is what the trainer reads.

    format       recognised by                     converted by        canonical record (read by)
    text         `text` (--text_field), .txt line  -                   {"text": str} (train_pretrain.py)
    sharegpt     `conversations`                   core.conversations  {"messages": [...], "tools"?: [...]}
    messages     `messages`                        core.conversations  (train_finetune.py)
    alpaca       `instruction` / `input`, `output` core.conversations
    preference   `chosen` / `rejected`             core.preferences    {"messages": [prompt], "chosen": reply,
                                                                       "rejected": reply, "tools"?} (train_dpo.py)
    qa           `ground_truth`, or `answer` with  core.prompt_rows    {"question": str, "answer": str}, or
                 `question` / `prompt` / `messages`                    {"prompt": [messages], "ground_truth": str}
                                                                       (GRPO / PPO)

Assistant tool calls stay in their message (`tool_calls`); a preference reply is a string, or a message object
when it carries more than text. A qa row keeps `data_source`, `ability` and `extra_info` (the rewards read them).
Preference and question/answer rows are recognised first: a preference row with `conversations` would otherwise
be taken for ShareGPT, a prompt row with `messages` for a chat.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from self_model.core.conversations import FORMATS as CHAT_FORMATS
from self_model.core.conversations import (
    detect_format,
    get_format,
    refuse_kto_row,
    row_tools,
    validate_conversation,
)
from self_model.core.preferences import FORMATS as PREFERENCE_FORMATS
from self_model.core.preferences import check_pair, detect_preference_format
from self_model.core.prompt_rows import ROW_SHAPES, convert_row
from self_model.core.rows import RowError

KIND_OF = {"text": "text", "sharegpt": "sft", "messages": "sft", "alpaca": "sft", "preference": "preference",
           "qa": "qa"}
TEXT_KEYS = ("text", "question", "answer", "ground_truth", "chosen", "rejected")  # what cleaning and filters read
MESSAGE_KEYS = ("messages", "prompt")  # lists of messages
QA_METADATA = ("data_source", "ability", "extra_info")  # passed to the rewards; kept as they are


def examples() -> str:
    lines = ['text: {"text": "..."} or a .txt file, one sample a line']
    lines += [f"{fmt.name}: {fmt.example}" for fmt in CHAT_FORMATS]
    lines += [f"preference ({fmt.name}): {fmt.example}" for fmt in PREFERENCE_FORMATS]
    lines += [f"qa: {shape}" for shape in ROW_SHAPES]
    return "\n".join(f"    {line}" for line in lines)


def is_prompt_row(row: dict[str, Any]) -> bool:
    """A prompt with a reference answer (GRPO / PPO): the shapes core.prompt_rows reads."""
    return "ground_truth" in row or ("answer" in row and any(key in row for key in ("question", "prompt", "messages")))


def detect(row: dict[str, Any], text_field: str) -> str:
    if "chosen" in row or "rejected" in row:
        return "preference"
    if is_prompt_row(row):
        return "qa"
    try:
        return detect_format(row)
    except RowError:
        if text_field in row:
            return "text"
    raise RowError(f"unrecognised row with keys {sorted(row)}; expected one of:\n{examples()}")


def convert(fmt: str, row: dict[str, Any], text_field: str) -> dict[str, Any]:
    """The canonical record of `row` read as `fmt`; raises RowError (or KeyError) with the trainer's message.

    Preference rows of different shapes may share a file here (train_dpo.py refuses that): they are all written
    in one shape."""
    if fmt == "text":
        if text_field not in row:
            raise RowError(f"no '{text_field}' field (keys: {sorted(row)}); set --text_field to the text column")
        return {"text": _string(row[text_field], f"'{text_field}'")}
    if fmt == "preference":
        refuse_kto_row(row, "DPO")
        name = detect_preference_format(row)
        prompt, chosen, rejected = PREFERENCE_FORMATS[name].convert(row)
        return _with_tools({"messages": prompt, "chosen": _reply(chosen), "rejected": _reply(rejected)}, row)
    if fmt == "qa":
        return _prompt_record(row)
    refuse_kto_row(row, "SFT")
    return _with_tools({"messages": get_format(fmt).convert(row)}, row)


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _with_tools(record: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    tools = row_tools(row)
    return {**record, "tools": tools} if tools else record


def _reply(message: dict[str, Any]) -> str | dict[str, Any]:
    """A reply as plain text, or as the message object when it carries more than its text (tool calls)."""
    return message["content"] if set(message) <= {"role", "content"} else message


def _prompt_record(row: dict[str, Any]) -> dict[str, Any]:
    prompt, truth = convert_row(row, None)
    if not isinstance(row.get("extra_info", {}), dict):
        raise RowError(f"'extra_info' must be an object, got {type(row['extra_info']).__name__}")
    if "question" in row and len(prompt) == 1:
        record: dict[str, Any] = {"question": prompt[0]["content"], "answer": truth}
    else:  # a system turn, or a prompt of messages: the prompt as the trainer reads it, with its reference answer
        record = {"prompt": prompt, "ground_truth": truth}
    return {**record, **{key: row[key] for key in QA_METADATA if row.get(key) not in (None, "", {})}}


def _map_message(message: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(message, str):
        return fn(message)
    return {**message, "content": fn(message["content"])}  # role, tool calls and any other field stay


def map_texts(record: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    """A copy of the canonical record with `fn` applied to every text it holds; roles, tool calls (their
    arguments too), tool definitions and qa metadata stay as they are."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key in MESSAGE_KEYS and isinstance(value, list):
            out[key] = [_map_message(m, fn) for m in value]
        elif key in TEXT_KEYS:
            out[key] = _map_message(value, fn)
        else:
            out[key] = value
    return out


def _message_text(message: Any) -> str:
    if isinstance(message, str):
        return message
    calls = message.get("tool_calls")
    call_text = json.dumps(calls, ensure_ascii=False, sort_keys=True) if calls else ""
    return "\n".join(part for part in (message["content"], call_text) if part)


def content(record: dict[str, Any]) -> str:
    """The text that lengths, language and duplicates are judged on: every turn, tool calls included.

    System turns and tool definitions are left out: many rows share them, which would make unrelated short
    samples look alike.
    """
    parts = [_message_text(m) for key in MESSAGE_KEYS if isinstance(record.get(key), list)
             for m in record[key] if m["role"] != "system"]
    parts += [_message_text(record[key]) for key in TEXT_KEYS if key in record]
    return "\n".join(parts)


def empty_field(record: dict[str, Any]) -> str | None:
    """Name of the first text that must not be empty but is, or None."""
    for key in TEXT_KEYS:
        if key in record and not _message_text(record[key]).strip():
            return f"'{key}'"
    for key in MESSAGE_KEYS:
        for i, msg in enumerate(record.get(key) or (), 1):
            if msg["role"] != "system" and not _message_text(msg).strip():
                return f"message {i} ({msg['role']})" if key == "messages" else f"'{key}' message {i} ({msg['role']})"
    return None


def check_structure(fmt: str, record: dict[str, Any]) -> None:
    """Read the cleaned record back as its trainer will (its converter and checks); raises RowError."""
    kind = KIND_OF[fmt]
    if kind == "sft":
        validate_conversation(get_format("messages").convert(record))
    elif kind == "preference":
        prompt, chosen, _ = PREFERENCE_FORMATS[detect_preference_format(record)].convert(record)
        check_pair(prompt, chosen, None, row_tools(record))
    elif kind == "qa":
        convert_row(record, None)
