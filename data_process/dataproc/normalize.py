"""Detect a row's format and convert it to the canonical record its training stage reads.

| format | input keys | canonical record | read by |
|---|---|---|---|
| text | `text` (or `--text_field`), or a .txt line | `{"text": str}` | train_pretrain.py |
| sharegpt / messages / alpaca | see self_model.core.conversations | `{"messages": [{"role", "content"}]}` | train_finetune.py |
| preference | `chosen`, `rejected`, prompt | `{"messages": [prompt], "chosen": str, "rejected": str}` | train_dpo.py |
| qa | `question` + `answer` | `{"question": str, "answer": str}` | GRPO / PPO |

The chat converters are the ones the trainers use (self_model.core.conversations), so what this tool accepts is
exactly what fine-tuning accepts. Preference and question/answer rows are checked first because a
preference row with `conversations` would otherwise be taken for ShareGPT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from self_model.core.conversations import RowError, detect_format, get_format, validate_conversation

KIND_OF = {"text": "text", "sharegpt": "sft", "messages": "sft", "alpaca": "sft", "preference": "preference",
           "qa": "qa"}
EXAMPLES = {
    "text": '{"text": "..."} or a .txt file, one sample a line',
    "sharegpt": '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}',
    "messages": '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    "alpaca": '{"instruction": "...", "input": "...", "output": "..."}',
    "preference": '{"conversations" | "messages" | "prompt" | "question": ..., "chosen": "...", "rejected": "..."}',
    "qa": '{"question": "...", "answer": "..."}',
}


def detect(row: dict[str, Any], text_field: str) -> str:
    if "chosen" in row and "rejected" in row:
        return "preference"
    if "question" in row and "answer" in row:
        return "qa"
    try:
        return detect_format(row)
    except RowError:
        if text_field in row:
            return "text"
    examples = "\n".join(f"    {name}: {example}" for name, example in EXAMPLES.items())
    raise RowError(f"unrecognised row with keys {sorted(row)}; expected one of:\n{examples}")


def convert(fmt: str, row: dict[str, Any], text_field: str) -> dict[str, Any]:
    """The canonical record of `row` read as `fmt`; raises RowError (or KeyError for a missing key)."""
    if fmt == "text":
        if text_field not in row:
            raise RowError(f"no '{text_field}' field (keys: {sorted(row)}); set --text_field to the text column")
        return {"text": _string(row[text_field], f"'{text_field}'")}
    if fmt == "preference":
        return _preference(row)
    if fmt == "qa":
        return {"question": _string(row["question"], "'question'"), "answer": _string(row["answer"], "'answer'")}
    return {"messages": get_format(fmt).convert(row)}


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _reply(value: Any, what: str) -> tuple[str, list[dict[str, Any]]]:
    """A chosen/rejected reply: a string, or a conversation ending in the assistant's reply (HH-RLHF style)."""
    if isinstance(value, list):
        messages = get_format("messages").convert({"messages": value})
        if messages[-1]["role"] != "assistant":
            raise RowError(f"{what} is a list of messages that does not end with an assistant reply")
        return messages[-1]["content"], messages[:-1]
    return _string(value, what), []


def _preference(row: dict[str, Any]) -> dict[str, Any]:
    chosen, chosen_prompt = _reply(row["chosen"], "'chosen'")
    rejected, _ = _reply(row["rejected"], "'rejected'")
    if "conversations" in row:
        prompt = get_format("sharegpt").convert(row)
    elif "messages" in row:
        prompt = get_format("messages").convert(row)
    elif isinstance(row.get("prompt"), list):
        prompt = get_format("messages").convert({"messages": row["prompt"]})
    elif any(key in row for key in ("prompt", "question", "instruction")):
        key = next(k for k in ("prompt", "question", "instruction") if k in row)
        text = _string(row[key], f"'{key}'")
        if row.get("input"):
            text = text + "\n" + _string(row["input"], "'input'")
        prompt = [{"role": "user", "content": text}]
        if row.get("system"):
            prompt.insert(0, {"role": "system", "content": _string(row["system"], "'system'")})
    elif chosen_prompt:
        prompt = chosen_prompt
    else:
        raise RowError("a preference row needs a prompt: 'conversations', 'messages', 'prompt' or 'question'")
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError("the prompt of a preference row must end with a user turn")
    return {"messages": prompt, "chosen": chosen, "rejected": rejected}


def map_texts(record: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    """A copy of the canonical record with `fn` applied to every text it holds (roles and tool calls stay)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key == "messages":
            out[key] = [{**m, "content": fn(m["content"])} for m in value]
        else:
            out[key] = fn(value)
    return out


def content(record: dict[str, Any]) -> str:
    """The text that lengths, language and duplicates are judged on.

    System turns are left out: many rows share one system prompt, which would make unrelated short
    samples look alike.
    """
    parts = [m["content"] for m in record.get("messages", ()) if m["role"] != "system"]
    parts += [record[key] for key in ("text", "question", "answer", "chosen", "rejected") if key in record]
    return "\n".join(parts)


def empty_field(record: dict[str, Any]) -> str | None:
    """Name of the first text that must not be empty but is, or None."""
    for key in ("text", "question", "answer", "chosen", "rejected"):
        if key in record and not record[key].strip():
            return f"'{key}'"
    for i, msg in enumerate(record.get("messages", ()), 1):
        if msg["role"] != "system" and not msg["content"].strip() and not msg.get("tool_calls"):
            return f"message {i} ({msg['role']})"
    return None


def check_structure(fmt: str, record: dict[str, Any]) -> None:
    """Roles in an order the trainers accept; raises RowError."""
    kind = KIND_OF[fmt]
    if kind == "sft":
        validate_conversation(record["messages"])
    elif kind == "preference":
        validate_conversation([*record["messages"], {"role": "assistant", "content": record["chosen"]}])
