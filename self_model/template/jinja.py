"""Generate the Jinja `chat_template` of a `ChatTemplate`, so inference renders what training rendered.

The string is saved in the checkpoint's tokenizer; `transformers`' `apply_chat_template` and vLLM render it
with `messages`, `tools`, `add_generation_prompt`, `bos_token` and `eos_token` (and, where the template has them,
its `variables` such as `date_string` and `enable_thinking`). It mirrors
`ChatTemplate.turns` / `render_spans` line by line; tests render both and compare, for every shipped family.
For `tokenize: pieces` families it renders the official string form (ChatGLM3: `<|user|>\\n {content}`);
the sample's final `eos` is a training-only marker and is not part of the string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from self_model.template.thinking import jinja_last_query, jinja_reply

if TYPE_CHECKING:
    from self_model.template.chat_template import ChatTemplate
    from self_model.template.tool_calls import ToolFormat


def expr(text: str, slots: dict[str, str] | None = None) -> str:
    """A Jinja expression for `text`: string literals joined with `+`, placeholders replaced by expressions.

    `{bos_token}` / `{eos_token}` become the template variables; `slots` maps further placeholders
    (e.g. `{tool}`) to expressions.
    """
    names = {"bos_token": "bos_token", "eos_token": "eos_token", **(slots or {})}
    pattern = re.compile(r"\{(" + "|".join(re.escape(n) for n in names) + r")\}")
    pieces = []
    for i, chunk in enumerate(pattern.split(text)):
        if i % 2:  # a captured placeholder name
            pieces.append(names[chunk])
        elif chunk:
            pieces.append(json.dumps(chunk, ensure_ascii=False))
    return " + ".join(pieces) if pieces else "''"


def out(expression: str) -> str:
    """`{{- expression -}}`: whitespace control everywhere, so the string has no stray spaces or newlines."""
    return "{{- " + expression + " -}}"


def tag(statement: str) -> str:
    return "{%- " + statement + " -%}"


def _raise(message: str) -> str:
    return out(f"raise_exception({json.dumps(message)})")


def _variables(t: ChatTemplate) -> list[str]:
    """Each variable keeps the value a caller passes (`apply_chat_template(..., date_string=...)`), else its
    default."""
    lines = []
    for name, value in t.variables.items():
        lines.append(tag(f"if {name} is not defined"))
        if isinstance(value, str):
            lines.append(tag(f"set {name} = {json.dumps(value, ensure_ascii=False)}"))
        else:  # today's date where the renderer offers strftime_now (transformers, vLLM), as Llama 3.2's template
            lines += [tag("if strftime_now is defined"),
                      tag(f"set {name} = strftime_now({json.dumps(value['strftime_now'])})"), tag("else"),
                      tag(f"set {name} = {json.dumps(value['default'], ensure_ascii=False)}"), tag("endif")]
        lines.append(tag("endif"))
    return lines


def _definitions(tf: ToolFormat, ex: Callable[..., str], start: str, target: str) -> list[str]:
    """`target` = `start` + intro + every definition + outro."""
    dump = "(tool | tojson)" if tf.indent is None else f"(tool | tojson(indent={tf.indent}))"
    return [tag(f"set defs = namespace(text={start} + {ex(tf.system_intro)})"), tag("for tool in tools"),
            tag(f"set defs.text = defs.text + {ex(tf.tool, {'tool': dump})}"), tag("endfor"),
            tag(f"set {target} = defs.text + {ex(tf.system_outro)}")]


def _tool_preamble(t: ChatTemplate, ex: Callable[..., str]) -> list[str]:
    """With tools: the definitions into `system_text`, or (`placement: first_user`) into `tool_text`."""
    tf = t.tools
    if tf is None:
        return [tag("if tools"), _raise(f"template {t.name} has no tool format"), tag("endif")]
    if tf.placement == "first_user":
        first_user = "not loop_messages or loop_messages[0]['role'] != 'user'"
        return [tag("if tools"), tag(f"if {first_user}"),
                _raise(f"template {t.name} puts the tools into the first user message, and there is none"),
                tag("endif"), *_definitions(tf, ex, "''", "tool_text"), tag("endif")]
    start = "(system_text or '')" if not tf.system_separator else \
        f"((system_text + {ex(tf.system_separator)}) if system_text is not none else '')"
    return [tag("if tools"), *_definitions(tf, ex, start, "system_text"), tag("endif")]


def _assistant(t: ChatTemplate, ex: Callable[..., str], content: str, turn: Callable[..., str]) -> list[str]:
    """The assistant branch: `body` (reasoning split off, tool calls appended), `lead` (the reasoning block)."""
    lines = [tag(f"set body = {content}")]
    lead = None
    if t.thinking is not None:
        lead = "lead"
        lines += [tag("set lead = ''")]
        lines += jinja_reply(t.thinking, ex(t.thinking.block, {"reasoning": "reasoning.strip('\\n')"}))
    tf = t.tools
    if tf is None:
        lines += [tag("if message['tool_calls']"), _raise(f"template {t.name} has no tool format"), tag("endif")]
        return lines + [turn("assistant", "body", lead=lead)]
    args = "(call['arguments'] | tojson)"
    if tf.string_arguments == "verbatim":
        args = f"(call['arguments'] if call['arguments'] is string else {args})"
    call = ex(tf.call, {"name": "call['name']", "arguments": args})
    unwrap = tag("set call = call['function'] if call['function'] is defined else call")
    lines.append(tag("if message['tool_calls']"))
    if tf.single_call:  # as the official template: one call, and the reply is the call alone
        lines += [tag("if message['tool_calls'] | length != 1"),
                  _raise(f"template {t.name} writes exactly one tool call per reply"), tag("endif"),
                  tag("set call = message['tool_calls'][0]"), unwrap, tag(f"set body = {call}")]
    else:
        lines += [tag("set calls = namespace(body=body)"), tag("for call in message['tool_calls']"), unwrap,
                  tag(f"set piece = {call}"),
                  tag(f"set calls.body = calls.body + {ex(tf.separator)} + piece if calls.body else piece"),
                  tag("endfor"), tag("set body = calls.body")]
    return lines + [tag("endif"), turn("assistant", "body", lead=lead)]


def _tool_results(tf: ToolFormat, ex: Callable[..., str]) -> list[str]:
    raw = "(message['content'] or '')"
    response = ex(tf.response, {"content": raw, "content_json": f"({raw} | tojson)"})
    if not tf.group_responses:
        return [out(f"{ex(tf.response_turn_prefix)} + {response} + {ex(tf.response_turn_suffix)}")]
    return [  # consecutive tool results share one turn, as in Qwen's templates
        tag("if loop.first or loop_messages[loop.index0 - 1]['role'] != 'tool'"), out(ex(tf.response_turn_prefix)),
        tag("else"), out(ex(tf.separator)), tag("endif"),
        out(response),
        tag("if loop.last or loop_messages[loop.index0 + 1]['role'] != 'tool'"), out(ex(tf.response_turn_suffix)),
        tag("endif")]


def to_jinja(t: ChatTemplate) -> str:
    variables = {name: name for name in t.variables}

    def ex(text: str, slots: dict[str, str] | None = None) -> str:
        return expr(text, {**variables, **(slots or {})})

    trim = " | trim" if t.strip_content else ""
    content = f"(message['content'] or ''){trim}"

    def turn(role: str, body: str, prefix: str | None = None, lead: str | None = None) -> str:
        markup = getattr(t, f"{role}_prefix")
        if markup is None:
            return _raise(f"template {t.name} has no system turn")
        parts = [prefix or ex(markup), ex(t.dummy_prefix), lead or "''", body, ex(getattr(t, f"{role}_suffix"))]
        return out(" + ".join(p for p in parts if p != "''"))

    default = json.dumps(t.default_system, ensure_ascii=False) if t.default_system is not None else "none"
    lines = [f"{{#- generated by self_model from template '{t.name}': edit the template JSON, not this string -#}}",
             *_variables(t)]
    if t.conversation_prefix:
        lines.append(out(ex(t.conversation_prefix)))
    lines += [
        tag("if messages and messages[0]['role'] == 'system'"),
        tag("set system_text = (messages[0]['content'] or '')" + trim),
        tag("set loop_messages = messages[1:]"),
        tag("else"),
        tag(f"set system_text = {default}"),
        tag("set loop_messages = messages"),
        tag("endif"),
        *_tool_preamble(t, ex),
    ]
    if t.thinking is not None:
        lines += jinja_last_query(t.tools.response_tags() if t.tools is not None else None)
    system_turn = turn("system", "system_text")
    if t.tools is not None and t.tools.system_prefix is not None:
        system_turn = tag("if tools") + turn("system", "system_text", prefix=ex(t.tools.system_prefix)) + \
            tag("else") + system_turn + tag("endif")
    user_body = content
    if t.tools is not None and t.tools.placement == "first_user":
        user_body = f"((tool_text if tools and loop.first else '') + {content})"
    later = t.later_system_prefix
    system_later = turn("system", content, prefix=ex(later) if later is not None else None) if t.system_anywhere \
        else _raise(f"template {t.name} allows a system turn only first")
    lines += [tag("if system_text is not none"), system_turn, tag("endif"),
              tag("for message in loop_messages"),
              tag("if message['role'] == 'user'"), turn("user", user_body),
              tag("elif message['role'] == 'assistant'"), *_assistant(t, ex, content, turn)]
    if t.tools is not None:
        lines += [tag("elif message['role'] == 'tool'"), *_tool_results(t.tools, ex)]
    lines += [
        tag("elif message['role'] == 'system'"), system_later,
        tag("else"),
        out(f"raise_exception('template {t.name} cannot render role ' + message['role'])"),
        tag("endif"),
        tag("endfor"),
        tag("if add_generation_prompt"), out(ex(t.prompt_for_generation)),
    ]
    if t.thinking is not None:  # Qwen3: enable_thinking=False prompts with the empty block, so the model answers
        lines += [tag("if enable_thinking is defined and enable_thinking is false"),
                  out(ex(t.thinking.empty_block())), tag("endif")]
    # every tag strips the whitespace around it, so one tag a line renders the same as one long line
    return "\n".join([*lines, tag("endif")])
