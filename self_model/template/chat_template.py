"""Chat templates: one JSON definition drives training (ids + labels) and inference (a Jinja chat_template).

A template file (`self_model/template/<name>.json`) holds the prefix/suffix strings users already edit;
the schema is documented in `self_model/template/README.md`. Two ways to turn a conversation into ids:

- `tokenize: text` (Qwen2.5, Qwen3, Llama-3, DeepSeek): render the conversation to text while recording which
  character spans are trained (each assistant reply and its end-of-turn token), tokenize the whole text
  once with offsets and label the tokens inside those spans. The ids are exactly what
  `tokenizer.apply_chat_template` produces from the generated Jinja string (and from the official one).
- `tokenize: pieces` (ChatGLM3, Baichuan2): each marker is its special-token id and every text piece is
  encoded on its own, as the official fine-tuning code does (see `pieces.py`).

Tool use lives in `tool_calls.py`, reasoning (`<think>`) in `thinking.py`, reading a template file in `schema.py`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from self_model.core.errors import UserError
from self_model.template.schema import TEMPLATE_DIR, available_templates, get_template, load_template
from self_model.template.thinking import ThinkingFormat, last_query_index
from self_model.template.tool_calls import ToolFormat

__all__ = ["IGNORE_INDEX", "TEMPLATE_DIR", "ChatTemplate", "Turn", "available_templates", "get_template",
           "load_template"]
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
# Marker strings written like <|name|> are special tokens; others are declared in `special_tokens`.
_MARKER = re.compile(r"<\|[^|<>\s]+\|>")


@dataclass(frozen=True)
class Turn:
    """One rendered turn: markup around a body (tool calls and grouped tool results already written out)."""

    role: str
    prefix: str
    body: str
    suffix: str


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format as prefix/suffix strings; `{bos_token}` / `{eos_token}` are filled from the tokenizer."""

    name: str
    # None: the family has no system turn (a conversation with one is refused, never silently dropped).
    system_prefix: str | None
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    # The string that ends an assistant turn and that generation stops on; it is trained. Empty only for
    # `tokenize: pieces` formats, which have no such token (see reply_end). Derived from assistant_suffix when a
    # file leaves it out (schema.py).
    end_of_turn: str
    description: str = ""
    # Emitted once at the start of every conversation (e.g. "{bos_token}", "[gMASK]sop").
    conversation_prefix: str = ""
    # What the model is prompted with at inference; defaults to assistant_prefix. The trained span of
    # each reply starts right after it (DeepSeek prompts with "Assistant:" and renders "Assistant: ").
    generation_prompt: str | None = None
    # System text used when a conversation has none (Qwen2.5 always emits a system turn).
    default_system: str | None = None
    # Strip leading/trailing whitespace of every message (Llama-3's `| trim`).
    strip_content: bool = False
    # Extra strings generation also stops on (besides end_of_turn and the tokenizer's eos).
    stop_words: list[str] = field(default_factory=list)
    # Whether a system turn may appear after the first message.
    system_anywhere: bool = False
    # The prefix of such a later system turn, when it differs from system_prefix (Llama 3.1 writes its date
    # lines only in the first).
    later_system_prefix: str | None = None
    # Tool definitions, calls and results; None: the family has no tool format.
    tools: ToolFormat | None = None
    # Reasoning before a reply (Qwen3's <think>); None: the family has none (reasoning_content is refused).
    thinking: ThinkingFormat | None = None
    # Placeholders {name} of the markup with their value: a string, or {"strftime_now": format, "default": text}
    # (today's date, as the official Llama 3.2 template writes it). The generated Jinja lets a caller pass them.
    variables: dict[str, Any] = field(default_factory=dict)
    # "text": tokenize the rendered conversation once; "pieces": encode each piece on its own (token-level).
    tokenize: str = "text"
    # pieces formats without end_of_turn: what the model learns right after a reply, "next_role" (the
    # following role token, ChatGLM3) or "eos" (eos in place of the following user token, Baichuan2).
    # The last reply always learns the eos that ends the sample.
    reply_end: str | None = None
    # pieces formats: what the string form (the chat_template) writes before each message's content,
    # standing for the SentencePiece dummy prefix of the separately encoded content (" " for ChatGLM3).
    dummy_prefix: str = ""
    # Marker strings that must be single tokens, with the id the family's own tokenizer gives them
    # (null: any id). Strings written like <|name|> are found in the prefixes without being listed.
    special_tokens: dict[str, int | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        gen = self.prompt_for_generation
        problems = []
        if not self.assistant_prefix.startswith(gen):
            problems.append(f"generation_prompt {gen!r} must be a prefix of assistant_prefix "
                            f"{self.assistant_prefix!r}")
        if self.end_of_turn and self.end_of_turn not in self.assistant_suffix:
            problems.append(f"end_of_turn {self.end_of_turn!r} must occur in assistant_suffix "
                            f"{self.assistant_suffix!r}")
        if self.tokenize not in ("text", "pieces"):
            problems.append(f"tokenize: {self.tokenize!r} is not allowed; expected 'text' or 'pieces'")
        elif self.tokenize == "text":
            if not self.end_of_turn:
                problems.append("end_of_turn: required with tokenize: text (the model must learn to stop)")
            if self.reply_end is not None or self.dummy_prefix:
                problems.append("reply_end / dummy_prefix: only used with tokenize: pieces")
        else:
            if self.tools is not None or self.thinking is not None:
                problems.append("tools / thinking: not supported with tokenize: pieces")
            if not self.end_of_turn and self.reply_end not in ("next_role", "eos"):
                problems.append(f"reply_end: expected 'next_role' or 'eos' (there is no end_of_turn), got "
                                f"{self.reply_end!r}")
        if self.system_prefix is None and self.default_system is not None:
            problems.append("default_system needs a system_prefix (system_prefix: null means no system turn)")
        if self.later_system_prefix is not None and not self.system_anywhere:
            problems.append("later_system_prefix needs system_anywhere: true")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def prompt_for_generation(self) -> str:
        return self.assistant_prefix if self.generation_prompt is None else self.generation_prompt

    def marker_tokens(self) -> dict[str, int | None]:
        """Every special-token string of the format, with its required id (None: any id)."""
        found: dict[str, int | None] = dict(self.special_tokens)
        for tok in _MARKER.findall(self._markup()):
            found.setdefault(tok, None)
        return found

    def _markup(self) -> str:
        """Every marker string of the format, concatenated (never message text)."""
        texts = [self.conversation_prefix, self.system_prefix or "", self.system_suffix, self.user_prefix,
                 self.user_suffix, self.assistant_prefix, self.assistant_suffix, self.end_of_turn, *self.stop_words,
                 self.later_system_prefix or "", self.thinking.block if self.thinking else ""]
        if self.tools is not None:
            texts += [v for v in dataclasses.asdict(self.tools).values() if isinstance(v, str)]
        return "\n".join(texts)

    # ---- roles -----------------------------------------------------------------------------------------
    def check_roles(self, messages: list[dict[str, Any]], tools: list[Any] | None = None) -> str | None:
        """Why this family cannot express the conversation, or None when it can."""
        if tools and self.tools is None:
            return f"the sample gives tools, but template '{self.name}' has no tool format{_hint('tools')}"
        for i, msg in enumerate(messages, 1):
            role = msg.get("role")
            if (role == "tool" or msg.get("tool_calls")) and self.tools is None:
                what = "a tool result" if role == "tool" else "an assistant tool call"
                return f"message {i} is {what}, but template '{self.name}' has no tool format{_hint('tools')}"
            if role not in ROLES:
                return f"message {i} has role '{role}', which template '{self.name}' cannot express"
            if role == "system" and self.system_prefix is None:
                return (f"message {i} is a system turn, but template '{self.name}' has no system turn; "
                        "put its text into the first user message, or use a template with one")
            if role == "system" and i > 1 and not self.system_anywhere:
                return f"message {i} is a system turn; template '{self.name}' allows a system turn only first"
            if msg.get("reasoning_content") and (problem := self._check_reasoning(msg, i)):
                return problem
            if role == "assistant" and self.tools and (problem := self.tools.check_call(msg, i, self.name)):
                return problem
        if tools and self.system_prefix is None:
            return f"template '{self.name}' has no system turn to hold the tool definitions"
        if tools and self.tools is not None and self.tools.placement == "first_user":
            rest = messages[1:] if messages and messages[0].get("role") == "system" else messages
            if not rest or rest[0].get("role") != "user":
                return (f"the sample gives tools, but no user message follows the system turn; template "
                        f"'{self.name}' puts the tool definitions into the first user message")
        return None

    def _check_reasoning(self, msg: dict[str, Any], i: int) -> str | None:
        if self.thinking is None:
            return (f"message {i} has reasoning_content, but template '{self.name}' has no thinking format"
                    f"{_hint('thinking')}")
        if msg["role"] != "assistant":
            return f"message {i} ({msg['role']}) has reasoning_content; only assistant messages carry reasoning"
        if not isinstance(msg["reasoning_content"], str):
            return f"message {i}: reasoning_content must be a string, got {type(msg['reasoning_content']).__name__}"
        return None

    def turns(self, messages: list[dict[str, Any]], tools: list[Any] | None = None) -> list[Turn]:
        """The conversation as turns: the system turn (given, default, or with the tools), then the rest."""
        problem = self.check_roles(messages, tools)
        if problem:
            raise UserError(problem)
        given = self.tools if tools else None  # the tool format, when this sample gives definitions
        out: list[Turn] = []
        rest = messages
        system = self.default_system
        if messages and messages[0]["role"] == "system":
            system, rest = self._content(messages[0]), messages[1:]
        if given is not None and given.placement == "system":
            system = given.system_text(system, tools or [])
        if system is not None and self.system_prefix is not None:
            prefix = self.system_prefix
            if given is not None and given.system_prefix is not None:  # Llama 3.1: the Environment line
                prefix = given.system_prefix
            out.append(Turn("system", prefix, system, self.system_suffix))
        tags = self.tools.response_tags() if self.tools is not None else None
        last_query = last_query_index(rest, tags) if self.thinking is not None else len(rest)
        i = 0
        while i < len(rest):
            msg, role = rest[i], rest[i]["role"]
            if role == "tool" and self.tools is not None:
                tf, results = self.tools, []
                while i < len(rest) and rest[i]["role"] == "tool":
                    results.append(tf.response_text(rest[i].get("content") or ""))
                    i += 1
                    if not tf.group_responses:
                        break
                out.append(Turn("tool", tf.response_turn_prefix, tf.separator.join(results), tf.response_turn_suffix))
                continue
            lead, body = "", self._content(msg)
            if role == "user" and i == 0 and given is not None and given.placement == "first_user":
                body = given.definitions(tools or []) + body
            if role == "assistant" and self.thinking is not None:
                lead, body = self.thinking.reply(msg, body, after_query=i > last_query, last=i == len(rest) - 1)
            if role == "assistant" and msg.get("tool_calls") and self.tools is not None:
                body = self.tools.body(body, msg["tool_calls"])
            prefix = getattr(self, f"{role}_prefix")
            if role == "system" and self.later_system_prefix is not None:
                prefix = self.later_system_prefix
            out.append(Turn(role, prefix, lead + body, getattr(self, f"{role}_suffix")))
            i += 1
        return out

    def _content(self, msg: dict[str, Any]) -> str:
        content = msg.get("content") or ""
        return content.strip() if self.strip_content else content

    def variable_values(self) -> dict[str, str]:
        """Each variable's value as a render without overrides writes it (today's date where it is one)."""
        return {name: value if isinstance(value, str) else datetime.now().strftime(value["strftime_now"])
                for name, value in self.variables.items()}

    def _filler(self, bos: str, eos: str) -> Callable[[str], str]:
        values = {"bos_token": bos, "eos_token": eos, **self.variable_values()}
        pattern = re.compile(r"\{(" + "|".join(re.escape(n) for n in values) + r")\}")
        return lambda text: pattern.sub(lambda m: values[m.group(1)], text)

    def fill(self, text: str, bos: str, eos: str) -> str:
        """`text` with `{bos_token}`, `{eos_token}` and the template's variables filled in."""
        return self._filler(bos, eos)(text)

    # ---- the string form (text tokenization, the chat_template, --dry-run) --------------------------------
    def render_spans(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                     bos_token: str = "", eos_token: str = "", tools: list[Any] | None = None,
                     enable_thinking: bool = True) -> tuple[str, list[tuple[int, int]]]:
        """The conversation as text and the character spans to train (one per assistant turn)."""
        fill = self._filler(bos_token, eos_token)
        gen, eot = fill(self.prompt_for_generation), fill(self.end_of_turn)
        parts: list[str] = [fill(self.conversation_prefix)]
        spans: list[tuple[int, int]] = []
        pos = len(parts[0])
        for turn in self.turns(messages, tools):
            prefix, suffix = fill(turn.prefix), fill(turn.suffix)
            text = prefix + (self.dummy_prefix if turn.role != "tool" else "") + turn.body + suffix
            if turn.role == "assistant":
                cut = suffix.index(eot) + len(eot) if eot else len(suffix)
                spans.append((pos + len(gen), pos + len(text) - len(suffix) + cut))
            parts.append(text)
            pos += len(text)
        if add_generation_prompt:
            parts.append(gen)
            if self.thinking is not None and enable_thinking is False:
                parts.append(self.thinking.empty_block())
        return "".join(parts), spans

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
               bos_token: str = "", eos_token: str = "", tools: list[Any] | None = None,
               enable_thinking: bool = True) -> str:
        return self.render_spans(messages, add_generation_prompt, bos_token, eos_token, tools, enable_thinking)[0]

    # ---- training and inference ids --------------------------------------------------------------------
    def encode(self, tokenizer: Any, messages: list[dict[str, Any]], mask_history: bool = False,
               tools: list[Any] | None = None) -> tuple[list[int], list[int]]:
        """Token ids of the whole conversation and labels that train the assistant replies (-100 elsewhere)."""
        if self.tokenize == "pieces":
            from self_model.template.pieces import encode_pieces

            return encode_pieces(self, tokenizer, messages, mask_history=mask_history)
        text, spans = self.render_spans(messages, False, tokenizer.bos_token or "", tokenizer.eos_token or "", tools)
        if mask_history:
            spans = spans[-1:]
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        span_index = 0
        for i, (start, end) in enumerate(enc["offset_mapping"]):
            while span_index < len(spans) and start >= spans[span_index][1]:
                span_index += 1
            if span_index == len(spans):
                break
            span_start, span_end = spans[span_index]
            # A token belongs to the reply when it starts inside the span (a byte-level BPE token may
            # carry the space that opens a reply, as in DeepSeek's "Assistant: reply").
            if span_start <= start < span_end or (start < span_start < end):
                labels[i] = ids[i]
        return ids, labels

    def prompt_ids(self, tokenizer: Any, messages: list[dict[str, Any]], tools: list[Any] | None = None,
                   enable_thinking: bool = True) -> list[int]:
        """The ids an inference prompt holds: the conversation so far and the generation prompt."""
        if self.tokenize == "pieces":
            from self_model.template.pieces import encode_pieces

            return encode_pieces(self, tokenizer, messages, add_generation_prompt=True)[0]
        text = self.prompt_text(tokenizer, messages, tools, enable_thinking)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_text(self, tokenizer: Any, messages: list[dict[str, Any]], tools: list[Any] | None = None,
                    enable_thinking: bool = True) -> str:
        """The inference prompt as text (the conversation so far and the generation prompt)."""
        return self.render(messages, True, tokenizer.bos_token or "", tokenizer.eos_token or "", tools,
                           enable_thinking)

    def save_source(self, folder: Path) -> None:
        """The template's JSON definition beside the model it was trained with (chat_template_source.json)."""
        (Path(folder) / "chat_template_source.json").write_text(
            json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False), encoding="utf-8")

    def to_jinja(self) -> str:
        """A Jinja chat_template that renders exactly what `render` renders."""
        from self_model.template.jinja import to_jinja

        return to_jinja(self)

    def apply_to_tokenizer(self, tokenizer: Any) -> None:
        tokenizer.chat_template = self.to_jinja()

    def stop_strings(self) -> list[str]:
        return [s for s in [self.end_of_turn, *self.stop_words] if s]

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids generation must stop on: the end-of-turn token(s) and the tokenizer's eos."""
        ids: list[int] = []
        for text in self.stop_strings() + ([tokenizer.eos_token] if tokenizer.eos_token else []):
            text = self.fill(text, tokenizer.bos_token or "", tokenizer.eos_token or "")
            tok_id = self.special_tokens.get(text) or tokenizer.convert_tokens_to_ids(text)
            if tok_id is not None and tok_id != tokenizer.unk_token_id and tok_id not in ids:
                ids.append(tok_id)
        return ids

    def special_token_ids(self, tokenizer: Any) -> dict[str, int]:
        """The id of every marker token in this tokenizer; raise when one is missing or has the wrong id."""
        found: dict[str, int] = {}
        missing, split, wrong = [], [], []
        vocab = tokenizer.get_vocab()
        for tok, want in self.marker_tokens().items():
            if tok not in vocab:
                missing.append(tok)
            elif self.tokenize == "text" and tokenizer(tok, add_special_tokens=False)["input_ids"] != [vocab[tok]]:
                split.append(tok)  # in the vocabulary, but rendered text would not give it back as one token
            elif want is not None and vocab[tok] != want:
                wrong.append(f"{tok} is id {vocab[tok]}, the {self.name} tokenizer has it at {want}")
            else:
                found[tok] = vocab[tok]
        absent = [name for name in ("bos_token", "eos_token")
                  if "{" + name + "}" in self._markup() and not getattr(tokenizer, name, None)]
        if self.tokenize == "pieces" and getattr(tokenizer, "eos_token_id", None) is None:
            absent.append("eos_token (every sample ends with it)")
        if missing or split or wrong or absent:
            lines = [f"the tokenizer does not fit template '{self.name}':"]
            if missing:
                lines.append(f"  it lacks the special tokens {missing} (each would be split into ordinary pieces "
                             "and the model would never learn the format)")
            if split:
                lines.append(f"  it has {split} in its vocabulary but splits them in text: add them as special "
                             "tokens (tokenizer.add_special_tokens) so the rendered prompt keeps them whole")
            lines += [f"  {w}" for w in wrong]
            if absent:
                lines.append(f"  it has no {' / '.join(absent)}, which the template writes")
            lines.append("Use the tokenizer of the model family this template is for, or pick the matching "
                         f"template (shipped: {', '.join(available_templates())}).")
            raise UserError("\n".join(lines))
        return found

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Fail when the tokenizer lacks a special token of this format (it would be split into pieces)."""
        self.special_token_ids(tokenizer)


# ---- hints naming the shipped templates that have a section ------------------------------------------------
def _hint(section: str) -> str:
    have = [name for name in available_templates() if getattr(get_template(name), section) is not None]
    turns = "tool turns" if section == "tools" else "reasoning"
    return f" (templates with {section}: {have}); remove the {turns} or switch template"
