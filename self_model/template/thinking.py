"""Reasoning in a reply (the `thinking` section): Qwen3's `<think>...</think>` as its official template renders it.

An assistant message carries its reasoning in `reasoning_content`, or inline as `<think>...</think>` at the start
of `content` (split off the way the official template splits it). Which replies show their reasoning:

- replies after the last user query (a user message that is not just a tool response) write the block
  `<think>\n{reasoning}\n</think>\n\n` before the reply text, the final reply always (an empty block when it has
  no reasoning), the others only when they have reasoning;
- earlier replies are written without it: their reasoning is neither rendered nor trained.

The block is part of the reply, so it is trained with it. At inference `enable_thinking=False` ends the
generation prompt with the empty block, so the model answers directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ThinkingFormat:
    """How a family writes the reasoning of a reply (the `thinking` section)."""

    block: str  # the reasoning block before the reply text; {reasoning} is the reasoning (newlines stripped)

    def __post_init__(self) -> None:
        if self.block.count("{reasoning}") != 1:
            raise ValueError("thinking.block must contain {reasoning} once")
        if not self.open_tag or not self.close_tag:
            raise ValueError("thinking.block must have a tag before and after {reasoning}, like <think> and </think>")

    @property
    def open_tag(self) -> str:
        return self.block.split("{reasoning}")[0].strip()

    @property
    def close_tag(self) -> str:
        return self.block.split("{reasoning}")[1].strip()

    def empty_block(self) -> str:
        """What `enable_thinking=False` adds to the generation prompt."""
        return self.block.replace("{reasoning}", "")

    def split(self, msg: dict[str, Any], content: str) -> tuple[str, str]:
        """(reasoning, reply text): `reasoning_content` when it is a string, else a leading inline block."""
        reasoning = msg.get("reasoning_content")
        if isinstance(reasoning, str):
            return reasoning, content
        if self.close_tag not in content:
            return "", content
        head, *_, tail = content.split(self.close_tag)
        return head.rstrip("\n").split(self.open_tag)[-1].lstrip("\n"), tail.lstrip("\n")

    def reply(self, msg: dict[str, Any], content: str, after_query: bool, last: bool) -> tuple[str, str]:
        """(the block written before the reply text, or "", the reply text)."""
        reasoning, content = self.split(msg, content)
        if after_query and (last or reasoning):
            return self.block.replace("{reasoning}", reasoning.strip("\n")), content.lstrip("\n")
        return "", content


def last_query_index(messages: list[dict[str, Any]], response_tags: tuple[str, str] | None) -> int:
    """Index of the last user message that is a query (not just a tool response); the last index when none is."""
    for k in range(len(messages) - 1, -1, -1):
        content = messages[k].get("content")
        if messages[k]["role"] != "user" or not isinstance(content, str):
            continue
        if response_tags and content.startswith(response_tags[0]) and content.endswith(response_tags[1]):
            continue
        return k
    return len(messages) - 1


# ---- the generated chat_template (jinja.py puts these lines in place) -----------------------------------------
def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def jinja_last_query(response_tags: tuple[str, str] | None) -> list[str]:
    """Sets `query.index` over `loop_messages`, as `last_query_index`."""
    not_response = ""
    if response_tags:
        head, tail = (_lit(t) for t in response_tags)
        not_response = f" and not (m['content'].startswith({head}) and m['content'].endswith({tail}))"
    return [
        "{%- set query = namespace(index=loop_messages | length - 1, found=false) -%}",
        "{%- for m in loop_messages[::-1] -%}",
        "{%- if not query.found and m['role'] == 'user' and m['content'] is string" + not_response + " -%}",
        "{%- set query.found = true -%}",
        "{%- set query.index = loop_messages | length - 1 - loop.index0 -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]


def jinja_reply(t: ThinkingFormat, block_expr: str) -> list[str]:
    """Inside the assistant branch: split the reasoning off `body`, set `lead` to the block when it is written.
    `block_expr` is the Jinja expression of the block with `reasoning` in place."""
    open_tag, close_tag = _lit(t.open_tag), _lit(t.close_tag)
    return [
        "{%- set reasoning = '' -%}",
        "{%- if message['reasoning_content'] is string -%}",
        "{%- set reasoning = message['reasoning_content'] -%}",
        f"{{%- elif {close_tag} in body -%}}",
        f"{{%- set reasoning = body.split({close_tag})[0].rstrip('\\n').split({open_tag})[-1].lstrip('\\n') -%}}",
        f"{{%- set body = body.split({close_tag})[-1].lstrip('\\n') -%}}",
        "{%- endif -%}",
        "{%- if loop.index0 > query.index and (loop.last or reasoning) -%}",
        f"{{%- set lead = {block_expr} -%}}",
        "{%- set body = body.lstrip('\\n') -%}",
        "{%- endif -%}",
    ]
