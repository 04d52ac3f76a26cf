"""Reading a template file (every field's type checked, all problems reported at once, `end_of_turn` derived)
and the shipped ones by name (`template: <name>`).

The original guide's template files hold six keys only (`system_prefix` ... `assistant_suffix`). They load:
`end_of_turn` is derived from `assistant_suffix` (the special token it starts with, `<|im_end|>`; else the
suffix without its trailing whitespace) and the log says what was derived.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from self_model.core.config import did_you_mean
from self_model.core.errors import ConfigError
from self_model.template.thinking import ThinkingFormat
from self_model.template.tool_calls import ToolFormat

if TYPE_CHECKING:  # chat_template imports this module; ChatTemplate is imported where a template is built
    from self_model.template.chat_template import ChatTemplate

logger = logging.getLogger("self_model")
TEMPLATE_DIR = Path(__file__).resolve().parent  # the shipped JSON files sit beside this module
_NULLABLE = {"system_prefix", "generation_prompt", "default_system", "reply_end", "tools", "thinking",
             "later_system_prefix"}
_BOOLS = {"strip_content", "system_anywhere"}
_SECTIONS = {"tools": ToolFormat, "thinking": ThinkingFormat}
_SECTION_BOOLS = {"single_call", "group_responses"}
_SECTION_NULLABLE = {"system_prefix", "indent"}
# What the generated chat_template or transformers already names: a variable may not take these names.
_RESERVED = {"messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token", "enable_thinking",
             "loop_messages", "system_text", "message", "tool", "tool_call", "call", "piece", "body", "lead", "ns",
             "query", "reasoning", "tool_text", "m", "loop", "namespace", "raise_exception", "strftime_now", "name",
             "arguments", "content", "content_json"}
# The special token an assistant_suffix starts with (<|im_end|>, <|eot_id|>), or the tokenizer's eos.
_LEADING_MARKER = re.compile(r"\s*(<\|[^|<>\s]+\|>|\{eos_token\})")


def derive_end_of_turn(assistant_suffix: str) -> str:
    """The end-of-turn string a suffix implies: its leading special token, else the suffix without trailing
    whitespace ("" when nothing is left)."""
    match = _LEADING_MARKER.match(assistant_suffix)
    return match.group(1) if match else assistant_suffix.rstrip()


def _type_problem(key: str, value: Any) -> str | None:
    if value is None:
        return None if key in _NULLABLE else f"{key}: must not be null"
    if key in _BOOLS:
        ok = isinstance(value, bool)
    elif key == "stop_words":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif key == "special_tokens":
        ok = isinstance(value, dict) and all(v is None or (isinstance(v, int) and not isinstance(v, bool))
                                             for v in value.values())
    elif key in ("tools", "thinking", "variables"):
        ok = isinstance(value, dict)
    else:
        ok = isinstance(value, str)
    expected = {"stop_words": "a list of strings", "special_tokens": "a mapping of token to id (or null)",
                "tools": "a mapping (see the README)", "thinking": "a mapping (see the README)",
                "variables": "a mapping of name to value"}.get(key, "true or false" if key in _BOOLS else "a string")
    return None if ok else f"{key}: expected {expected}, got {value!r}"


def _section_problems(section: str, values: dict[str, Any]) -> list[str]:
    fields = {f.name: f for f in dataclasses.fields(_SECTIONS[section])}
    problems = [f"{section}.{k}: unknown field{did_you_mean(k, fields)}" for k in values if k not in fields]
    problems += [f"{section}.{k}: required field is missing" for k, f in fields.items()
                 if k not in values and f.default is dataclasses.MISSING]
    for k, v in values.items():
        if k not in fields or (v is None and k in _SECTION_NULLABLE):
            continue
        if k in _SECTION_BOOLS:
            ok, expected = isinstance(v, bool), "true or false"
        elif k == "indent":
            ok, expected = isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number or null"
        else:
            ok, expected = isinstance(v, str), "a string"
        if not ok:
            problems.append(f"{section}.{k}: expected {expected}, got {v!r}")
    return problems


def _variable_problems(variables: dict[str, Any]) -> list[str]:
    problems = []
    for name, value in variables.items():
        if not name.isidentifier() or name in _RESERVED:
            problems.append(f"variables.{name}: not allowed as a variable name (an identifier not in use by the "
                            "chat template: not messages, tools, bos_token, ...)")
        elif not isinstance(value, str) and not (
                isinstance(value, dict) and set(value) == {"strftime_now", "default"}
                and all(isinstance(v, str) for v in value.values())):
            problems.append(f"variables.{name}: expected a string or {{\"strftime_now\": format, \"default\": "
                            f"text}}, got {value!r}")
    return problems


def _derive(data: dict[str, Any], source: str) -> None:
    """Fill a missing end_of_turn from assistant_suffix, and say so."""
    suffix = data.get("assistant_suffix")
    if "end_of_turn" in data or not isinstance(suffix, str) or not derive_end_of_turn(suffix):
        return
    data["end_of_turn"] = derive_end_of_turn(suffix)
    logger.info("template %s: end_of_turn not given, derived %r from assistant_suffix %r (trained at the end of "
                "each reply, and generation stops on it); set end_of_turn to choose another", source,
                data["end_of_turn"], suffix)


def template_from_dict(data: dict[str, Any], source: str) -> ChatTemplate:
    from self_model.template.chat_template import ChatTemplate

    fields = {f.name: f for f in dataclasses.fields(ChatTemplate)}
    data = dict(data)
    _derive(data, source)
    problems = []
    for key in data:
        if key not in fields:
            problems.append(f"{key}: unknown template field{did_you_mean(key, fields)}")
    for name, f in fields.items():
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            hint = " (assistant_suffix has no end-of-turn text to derive it from)" if name == "end_of_turn" else ""
            problems.append(f"{name}: required template field is missing{hint}")
    problems += [p for key, value in data.items() if key in fields and (p := _type_problem(key, value))]
    for section in _SECTIONS:
        if isinstance(data.get(section), dict):
            problems += _section_problems(section, data[section])
    if isinstance(data.get("variables"), dict):
        problems += _variable_problems(data["variables"])
    if problems:
        raise ConfigError(problems + ["(the template schema is documented in self_model/template/README.md)"],
                          source=source)
    try:
        for section, cls in _SECTIONS.items():
            if isinstance(data.get(section), dict):
                data[section] = cls(**data[section])
        return ChatTemplate(**data)
    except ValueError as exc:
        raise ConfigError([str(exc)], source=source) from None


# ---- the shipped templates -------------------------------------------------------------------------------------
def available_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))


def load_template(path: str | Path) -> ChatTemplate:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"template_path: file not found: {path} (shipped templates: {available_templates()})"])
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{path}:{exc.lineno}: not valid JSON: {exc.msg}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a JSON object of template fields"])
    data.setdefault("name", path.stem)
    return template_from_dict(data, str(path))


def get_template(name: str) -> ChatTemplate:
    known = available_templates()
    if name not in known:
        raise ConfigError([f"template: unknown template '{name}'{did_you_mean(name, known)}; shipped: {known}"])
    return load_template(TEMPLATE_DIR / f"{name}.json")
