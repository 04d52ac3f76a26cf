"""Tool use in a chat template: how a family writes tool definitions, tool calls and tool results.

Two official layouts are expressed by one `tools` section (its fields are documented in the README):

- Qwen2.5 / Qwen3 (`placement: system`): the definitions go into the system turn as JSON lines inside
  <tools></tools>; each call is `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` after the reply
  text; consecutive tool results share one user turn, each inside <tool_response></tool_response>.
- Llama 3.1 / 3.2 (`placement: first_user`): the definitions (JSON indented by 4) open the first user message,
  the system turn gains an `Environment: ipython` line, a reply is exactly one bare JSON call
  `{"name": ..., "parameters": {...}}`, and every result is an `ipython` turn of its own, written as JSON.

JSON is written exactly as the `tojson` filter of transformers' chat-template environment writes it, so the
Python rendering and the generated Jinja agree byte for byte.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_SLOT = re.compile(r"\{(tool|name|arguments|content_json|content)\}")
PLACEMENTS = ("system", "first_user")
STRING_ARGUMENTS = ("json", "verbatim")


def tojson(value: Any, indent: int | None = None) -> str:
    """JSON exactly as the `tojson` filter of transformers' chat-template environment writes it."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def substitute(text: str, values: dict[str, str]) -> str:
    return _SLOT.sub(lambda m: values.get(m.group(1), m.group(0)), text)


@dataclass(frozen=True)
class ToolFormat:
    """How a family writes tool definitions, tool calls and tool results (the `tools` section)."""

    system_intro: str  # before the tool list (in the system turn, or at the start of the first user message)
    tool: str  # one tool definition; {tool} is its JSON
    system_outro: str  # after the tool list
    call: str  # one call inside an assistant turn; {name}, {arguments} (JSON)
    separator: str  # between the reply text and its calls, between calls, between grouped results
    response_turn_prefix: str  # consecutive tool results form one turn (unless group_responses is false)
    response: str  # one result; {content} as it is, or {content_json} written as a JSON string
    response_turn_suffix: str
    # Optional, each only where an official format needs it:
    placement: str = "system"  # where the definitions go: "system" (appended to the system text) or "first_user"
    system_separator: str = ""  # between a given system text and system_intro (Qwen3: "\n\n")
    system_prefix: str | None = None  # the system turn's prefix when the sample gives tools (Llama 3.1's Environment)
    indent: int | None = None  # definitions as tojson(indent=...) (Llama 3.1: 4)
    string_arguments: str = "json"  # a call whose arguments are a string: "json" (quoted) or "verbatim" (Qwen3)
    single_call: bool = False  # exactly one call per reply and no text beside it (Llama 3.1)
    group_responses: bool = True  # consecutive results share one turn (Qwen); false: one turn each (Llama)

    def __post_init__(self) -> None:
        problems = []
        for key, slots in (("tool", ["{tool}"]), ("call", ["{name}", "{arguments}"])):
            missing = [s for s in slots if s not in getattr(self, key)]
            if missing:
                problems.append(f"tools.{key} must contain {' and '.join(missing)}")
        if "{content}" not in self.response and "{content_json}" not in self.response:
            problems.append("tools.response must contain {content} or {content_json}")
        if self.placement not in PLACEMENTS:
            problems.append(f"tools.placement: expected one of {list(PLACEMENTS)}, got {self.placement!r}")
        if self.string_arguments not in STRING_ARGUMENTS:
            problems.append(f"tools.string_arguments: expected one of {list(STRING_ARGUMENTS)}, got "
                            f"{self.string_arguments!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def definitions(self, tools: list[Any]) -> str:
        """The intro, every definition and the outro."""
        defs = "".join(substitute(self.tool, {"tool": tojson(t, self.indent)}) for t in tools)
        return self.system_intro + defs + self.system_outro

    def system_text(self, system: str | None, tools: list[Any]) -> str:
        """The system text with the definitions appended (`placement: system`)."""
        lead = "" if system is None else system + self.system_separator
        return lead + self.definitions(tools)

    def call_text(self, call: dict[str, Any]) -> str:
        fn = call.get("function", call)
        args = fn.get("arguments")
        written = args if isinstance(args, str) and self.string_arguments == "verbatim" else tojson(args)
        return substitute(self.call, {"name": str(fn.get("name")), "arguments": written})

    def body(self, content: str, calls: list[dict[str, Any]]) -> str:
        if self.single_call:  # the reply is the call alone (check_roles refused text beside it)
            return self.call_text(calls[0])
        return self.separator.join(([content] if content else []) + [self.call_text(c) for c in calls])

    def response_text(self, content: str) -> str:
        return substitute(self.response, {"content": content, "content_json": tojson(content)})

    def response_tags(self) -> tuple[str, str] | None:
        """The markers around one result (`<tool_response>`, `</tool_response>`), when the format has them."""
        slot = "{content}" if "{content}" in self.response else "{content_json}"
        head, tail = (part.strip() for part in self.response.split(slot, 1))
        return (head, tail) if head and tail else None

    def check_call(self, msg: dict[str, Any], i: int, name: str) -> str | None:
        """Why an assistant message's tool calls cannot be written in this format, or None."""
        calls = msg.get("tool_calls") or []
        if not self.single_call or not calls:
            return None
        if len(calls) != 1:
            return (f"message {i} has {len(calls)} tool calls; template '{name}' writes exactly one call per reply "
                    "(its official template refuses more): split them into call/result rounds")
        if (msg.get("content") or "").strip():
            return (f"message {i} has text beside its tool call; template '{name}' writes only the call (its "
                    "official template drops the text, which would then be trained on nothing): remove the text")
        return None
