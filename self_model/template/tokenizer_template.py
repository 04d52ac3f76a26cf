"""The tokenizer's own `chat_template` behind the same methods as a template JSON (`ChatTemplate`).

With neither `template_path` nor `template` set, a stage trains and generates with the chat template the
tokenizer already carries. Callers never branch on which kind they hold: both render, encode with a label
mask, measure prompts, give stop ids and save themselves into a model folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from self_model.core.errors import UserError
from self_model.template.chat_template import IGNORE_INDEX


class TokenizerTemplate:
    """The tokenizer's `chat_template` (Jinja), used as it is."""

    name = "the tokenizer chat_template"

    def check_roles(self, messages: list[dict[str, Any]], tools: list[Any] | None = None) -> str | None:
        """The Jinja template itself decides which turns it can express (it raises while rendering)."""
        return None

    def check_tokenizer(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("no chat template: set template_path (a JSON in self_model/template/) or template: "
                            "<name>; the tokenizer has no chat_template of its own either")

    def encode(self, tokenizer: Any, messages: list[dict[str, Any]], mask_history: bool = False,
               tools: list[Any] | None = None) -> tuple[list[int], list[int]]:
        """Label mask from the chat_template: each assistant reply is what the template adds after the
        generation prompt of the conversation so far."""
        ids: list[int] = []
        labels: list[int] = []
        last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(messages[:i], tools=tools, tokenize=False,
                                                   add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages[: i + 1], tools=tools, tokenize=False)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            if prompt_ids[: len(ids)] != ids or full_ids[: len(prompt_ids)] != prompt_ids:
                raise UserError("the tokenizer's chat_template does not render conversations incrementally, so the "
                                "reply tokens cannot be told apart; set template_path to a template JSON instead")
            train = not mask_history or i == last_assistant
            reply = full_ids[len(prompt_ids):]
            labels += [IGNORE_INDEX] * (len(prompt_ids) - len(ids)) + (reply if train else [IGNORE_INDEX] * len(reply))
            ids = full_ids
        return ids, labels

    def prompt_ids(self, tokenizer: Any, messages: list[dict[str, Any]], tools: list[Any] | None = None,
                   enable_thinking: bool = True) -> list[int]:
        text = self.prompt_text(tokenizer, messages, tools, enable_thinking)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_text(self, tokenizer: Any, messages: list[dict[str, Any]], tools: list[Any] | None = None,
                    enable_thinking: bool = True) -> str:
        """`enable_thinking` reaches the template as the variable Qwen3's templates read (others ignore it)."""
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=enable_thinking)

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Only the tokenizer's eos: a Jinja template does not say which token ends a turn."""
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def apply_to_tokenizer(self, tokenizer: Any) -> None:
        """Nothing to do: the tokenizer already carries this template."""

    def save_source(self, folder: Path) -> None:
        """Nothing to write: the template travels inside the saved tokenizer."""
