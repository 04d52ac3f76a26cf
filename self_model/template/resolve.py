"""Which chat template a stage uses: `template_path`, else `template`, else the tokenizer's own."""

from __future__ import annotations

import logging
from typing import Any

from self_model.template.chat_template import ChatTemplate, get_template, load_template
from self_model.template.tokenizer_template import TokenizerTemplate

logger = logging.getLogger("self_model")

# What every caller holds: both kinds answer the same methods (render, encode, prompt_ids, stop_token_ids, ...).
Template = ChatTemplate | TokenizerTemplate


def resolve_template(cfg: Any, tokenizer: Any) -> Template:
    """`cfg.template_path`, else `cfg.template`, else the tokenizer's chat_template (said so in the log)."""
    if cfg.template_path:
        template: Template = load_template(cfg.template_path)
    elif cfg.template:
        template = get_template(cfg.template)
    else:
        template = TokenizerTemplate()
        template.check_tokenizer(tokenizer)
        logger.warning("no template_path/template set: using the tokenizer's own chat_template")
        return template
    template.check_tokenizer(tokenizer)
    return template
