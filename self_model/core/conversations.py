"""Chat data: read JSONL/JSON files, convert each row to canonical messages, validate with file:line errors.

Canonical sample: `{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str, ...}], "format": name,
"source": "file:line"}`, plus `"tools"` (a list of tool definitions) when the row gives them. An assistant tool
call is `{"role": "assistant", "content": str, "tool_calls": [{"type": "function", "function": {"name": str,
"arguments": object}}]}` (OpenAI's JSON-string arguments are parsed, as chat templates expect an object).
A data format is a small converter registered by name (see `register_format`); `format: auto`
detects the format of each row from its keys and refuses a file that mixes formats.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from self_model.core.config import did_you_mean
from self_model.core.errors import UserError
from self_model.core.registry import Registry
from self_model.core.rows import OneFormatPerFile, RowError, iter_rows, read_rows

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names and the roles they map to.
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant", "bot": "assistant",
    "system": "system",
    "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool",
}


@dataclass(frozen=True)
class DataFormat:
    name: str
    detect: Callable[[dict[str, Any]], bool]
    convert: Callable[[dict[str, Any]], list[dict[str, Any]]]
    example: str


FORMATS: Registry[DataFormat] = Registry("data format")


def register_format(fmt: DataFormat) -> DataFormat:
    return FORMATS.register(fmt.name, fmt)


def get_format(name: str) -> DataFormat:
    return FORMATS.get(name, extra_choices=("auto",))


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _from_sharegpt(row: dict[str, Any]) -> list[dict[str, Any]]:
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise RowError("'conversations' must be a non-empty list of {from, value} turns")
    messages: list[dict[str, Any]] = []
    if row.get("system"):
        messages.append({"role": "system", "content": _text(row["system"], "'system'")})
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError(f"turn {i} must be an object with 'from' and 'value', got {json.dumps(turn)[:80]}")
        speaker = turn["from"]
        if speaker not in SHAREGPT_ROLES:
            raise RowError(f"turn {i} has from={speaker!r}; expected one of {sorted(set(SHAREGPT_ROLES))}"
                           f"{did_you_mean(str(speaker), SHAREGPT_ROLES)}")
        value = _text(turn["value"], f"turn {i} 'value'")
        if speaker == "function_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": parse_tool_calls(value, i)})
        else:
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return messages


def parse_tool_calls(value: str, turn: int | str) -> list[dict[str, Any]]:
    """A ShareGPT function_call value: one {name, arguments} JSON object, or a list of them (parallel calls)."""
    try:
        calls = json.loads(value)
    except json.JSONDecodeError:
        raise RowError(f"turn {turn} is a function_call whose value is not JSON: {value[:80]!r}") from None
    calls = calls if isinstance(calls, list) else [calls]
    if not calls or not all(isinstance(c, dict) and "name" in c for c in calls):
        raise RowError(f"turn {turn} is a function_call; expected JSON with 'name' and 'arguments' (or a list)")
    return [tool_call(c, f"turn {turn}") for c in calls]


def tool_call(call: dict[str, Any], where: str) -> dict[str, Any]:
    """One call as {"type": "function", "function": {"name", "arguments": object}}; JSON-string arguments parsed."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise RowError(f"{where}: a tool call needs a function name, got {json.dumps(call, ensure_ascii=False)[:80]}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise RowError(f"{where}: tool call '{fn['name']}' has arguments that are not JSON: {args[:80]!r}"
                           ) from None
    return {"type": "function", "function": {"name": fn["name"], "arguments": args}}


def row_tools(row: dict[str, Any]) -> list[Any] | None:
    """The row's tool definitions: a list, or a JSON string of one (LLaMA-Factory's ShareGPT `tools`)."""
    tools = row.get("tools")
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise RowError(f"'tools' is a string but not JSON: {tools[:80]!r}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError("'tools' must be a list of tool definitions (JSON objects)")
    return tools or None


def _from_alpaca(row: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if row.get("system"):
        messages.append({"role": "system", "content": _text(row["system"], "'system'")})
    for i, pair in enumerate(row.get("history") or [], 1):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RowError(f"history item {i} must be a [question, answer] pair")
        messages.append({"role": "user", "content": _text(pair[0], f"history item {i} question")})
        messages.append({"role": "assistant", "content": _text(pair[1], f"history item {i} answer")})
    instruction = _text(row.get("instruction") or "", "'instruction'")
    extra = _text(row.get("input") or "", "'input'")
    prompt = "\n".join(part for part in (instruction, extra) if part)
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": _text(row.get("output"), "'output'")})
    return messages


def _from_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise RowError("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, msg in enumerate(messages, 1):
        if not isinstance(msg, dict) or "role" not in msg:
            raise RowError(f"message {i} must be an object with 'role' and 'content'")
        clean = {"role": msg["role"], "content": msg.get("content") if msg.get("content") is not None else ""}
        if msg.get("tool_calls"):
            if not isinstance(msg["tool_calls"], list):
                raise RowError(f"message {i} 'tool_calls' must be a list")
            clean["tool_calls"] = [tool_call(c, f"message {i}") for c in msg["tool_calls"]]
        if msg.get("reasoning_content") and msg["role"] == "assistant":
            # Qwen3-style thinking: the template decides where it is rendered and trained (or refuses it).
            clean["reasoning_content"] = _text(msg["reasoning_content"], f"message {i} 'reasoning_content'")
        _text(clean["content"], f"message {i} 'content'")
        out.append(clean)
    return out


register_format(DataFormat("sharegpt", lambda r: "conversations" in r, _from_sharegpt,
                           '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}'))
register_format(DataFormat("messages", lambda r: "messages" in r, _from_messages,
                           '{"messages": [{"role": "user", "content": "..."}, '
                           '{"role": "assistant", "content": "..."}]}'))
register_format(DataFormat("alpaca", lambda r: "output" in r and ("instruction" in r or "input" in r), _from_alpaca,
                           '{"instruction": "...", "input": "...", "output": "..."}'))


# Where KTO rows go (the command is named in the refusal; core only names it, it imports no stage).
KTO_COMMAND = ("uv run python self_model/rlhf/train_preference.py --config config/self_model_config/preference.yaml "
               "loss=kto")


def refuse_kto_row(row: dict[str, Any], stage: str) -> None:
    """A KTO row (one reply marked desirable or not: `label` / LLaMA-Factory's `kto_tag`) is not an SFT sample nor
    a preference pair: SFT would learn the undesirable replies too. Refused, never trained silently."""
    for key in ("label", "kto_tag"):
        if isinstance(row.get(key), bool):
            if stage == "SFT":
                fix = f"for SFT, keep only rows with '{key}': true and remove the key"
            else:
                fix = f"{stage} needs a chosen and a rejected reply per row"
            raise RowError(f"this is a KTO row ('{key}': {str(row[key]).lower()} marks its reply desirable or not); "
                           f"{stage} would train it as if every reply were good. Train KTO on such rows: "
                           f"{KTO_COMMAND}; {fix}")


def detect_format(row: dict[str, Any]) -> str:
    return FORMATS.detect(row)


def validate_conversation(messages: list[dict[str, Any]]) -> None:
    """Roles in order: an optional system turn, then user/assistant alternating, tool results after a call."""
    expected_next = "user"
    for i, msg in enumerate(messages, 1):
        role = msg["role"]
        if role not in ROLES:
            raise RowError(f"message {i} has role '{role}'; expected one of {list(ROLES)}{did_you_mean(role, ROLES)}"
                           " (ShareGPT from-values human/gpt/system/function_call/observation are mapped "
                           "automatically)")
        if role == "system":
            if i != 1:
                continue  # the template decides whether a later system turn can be expressed
            continue
        if not msg["content"].strip() and not msg.get("tool_calls"):
            raise RowError(f"message {i} ({role}) is empty")
        if role == "tool":
            if expected_next not in ("tool", "assistant") or i == 1:
                raise RowError(f"message {i} is a tool result without a preceding assistant tool call")
            expected_next = "assistant"
            continue
        if role != expected_next and not (role == "assistant" and expected_next == "tool"):
            raise RowError(f"message {i} is '{role}' but a '{expected_next}' turn was expected "
                           "(turns must alternate user/assistant after an optional system turn)")
        expected_next = "tool" if role == "assistant" and msg.get("tool_calls") else (
            "assistant" if role == "user" else "user")
    if not messages or messages[-1]["role"] != "assistant":
        raise RowError("the conversation does not end with an assistant turn, so there is nothing to train on")


def load_conversations(paths: str | list[str], fmt: str = "auto",
                       check: Callable[[list[dict[str, Any]], list[Any] | None], str | None] | None = None,
                       ) -> list[dict[str, Any]]:
    """Read every file, convert and validate every row; raise one DataError listing the first problems.

    `check(messages, tools)` is an extra per-conversation test (the template's: can it express these turns?).
    """
    if fmt != "auto":
        get_format(fmt)  # an unknown name fails here, listing the known ones
    one_format = OneFormatPerFile()

    def convert(row: dict[str, Any], loc: str, path: Path) -> dict[str, Any]:
        refuse_kto_row(row, "SFT")
        name = detect_format(row) if fmt == "auto" else fmt
        one_format.check(path, name, loc)
        messages = FORMATS[name].convert(row)  # type: ignore[index]
        validate_conversation(messages)
        tools = row_tools(row)
        if check and (reason := check(messages, tools)):
            raise RowError(reason)
        sample = {"messages": messages, "format": name, "source": loc}
        return {**sample, "tools": tools} if tools else sample

    return read_rows(paths, convert, hint="Fix these rows (nothing was trained); "
                     "data_process/process_data.py can clean a file and report what it removed.")


def first_prompt(paths: str | list[str]) -> list[dict[str, Any]]:
    """The first conversation of the data up to its first assistant turn (a prompt for a quick demo answer)."""
    path = paths if isinstance(paths, str) else paths[0]
    for _, row in iter_rows(path):
        if isinstance(row, dict):
            messages = FORMATS[detect_format(row)].convert(row)
            first_reply = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
            return messages[:first_reply]
    raise UserError(f"{path}: no rows")
