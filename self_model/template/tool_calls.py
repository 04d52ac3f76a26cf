"""Tool use in a chat template: how a family writes tool definitions, tool calls and tool results.

Qwen2.5's format (the `tools` section of `qwen2_chatml.json`): the definitions go into the system turn as
JSON lines inside <tools></tools>; each call is `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`
after the reply text; consecutive tool results share one user turn, each inside <tool_response></tool_response>.
JSON is written exactly as the `tojson` filter of transformers' chat-template environment writes it, so the
Python rendering and the generated Jinja agree byte for byte.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_SLOT = re.compile(r"\{(tool|name|arguments|content)\}")


def tojson(value: Any) -> str:
    """JSON exactly as the `tojson` filter of transformers' chat-template environment writes it."""
    return json.dumps(value, ensure_ascii=False)


def substitute(text: str, values: dict[str, str]) -> str:
    return _SLOT.sub(lambda m: values.get(m.group(1), m.group(0)), text)


@dataclass(frozen=True)
class ToolFormat:
    """How a family writes tool definitions, tool calls and tool results (the `tools` section)."""

    system_intro: str  # appended to the system text when tools are given, before the tool list
    tool: str  # one tool definition; {tool} is its JSON
    system_outro: str  # after the tool list
    call: str  # one call inside an assistant turn; {name}, {arguments} (JSON)
    separator: str  # between the reply text and its calls, between calls, between grouped results
    response_turn_prefix: str  # consecutive tool results form one turn
    response: str  # one result; {content}
    response_turn_suffix: str

    def __post_init__(self) -> None:
        for key, slots in (("tool", ["{tool}"]), ("call", ["{name}", "{arguments}"]), ("response", ["{content}"])):
            missing = [s for s in slots if s not in getattr(self, key)]
            if missing:
                raise ValueError(f"tools.{key} must contain {' and '.join(missing)}")

    def system_text(self, tools: list[Any]) -> str:
        return self.system_intro + "".join(substitute(self.tool, {"tool": tojson(t)}) for t in tools) + \
            self.system_outro

    def call_text(self, call: dict[str, Any]) -> str:
        fn = call.get("function", call)
        return substitute(self.call, {"name": str(fn.get("name")), "arguments": tojson(fn.get("arguments"))})

    def body(self, content: str, calls: list[dict[str, Any]]) -> str:
        return self.separator.join(([content] if content else []) + [self.call_text(c) for c in calls])
