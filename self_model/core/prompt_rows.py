"""Prompts with a reference answer (what PPO / GRPO rewards check replies against): the row shapes and reading.

Shared by the RL stage (self_model/rlhf/ppo_grpo) and data_process, which must accept exactly what the trainer does:

    {"question": "...", "answer": "..."}                                   MedicalGPT's grpo_sample.jsonl
    {"prompt": "..." or [messages], "ground_truth": "..."}                 ("answer" works too)
    {"messages": [... ending on a user turn], "ground_truth": "..."}       (or ending on the reference reply)

Optional keys: "system", "data_source" (default: the file's name), "ability", "extra_info" (an object passed to the
rewards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from self_model.core.conversations import validate_conversation
from self_model.core.rows import RowError, read_rows

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


def load_prompts(paths: str | list[str], system_prompt: str | None = None) -> list[dict[str, Any]]:
    """Every row as {messages, ground_truth, data_source, ability, extra_info, source}; one DataError for bad rows."""

    def convert(row: dict[str, Any], loc: str, path: Path) -> dict[str, Any]:
        messages, truth = convert_row(row, system_prompt)
        extra = row.get("extra_info", {})
        if not isinstance(extra, dict):
            raise RowError(f"'extra_info' must be an object, got {type(extra).__name__}")
        return {"messages": messages, "ground_truth": truth, "source": loc, "extra_info": extra,
                "data_source": str(row.get("data_source") or path.stem), "ability": str(row.get("ability") or "qa")}

    return read_rows(paths, convert)


