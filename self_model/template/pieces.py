"""Token-level chat formats (`tokenize: pieces`): ChatGLM3 and Baichuan2 as their official fine-tuning code builds
them.

Each marker is its special-token id and every text piece is encoded on its own, never the rendered
string (a SentencePiece tokenizer adds a dummy prefix to each piece, so the concatenated string would
tokenize differently):

- ChatGLM3 (THUDM/ChatGLM3 `finetune_demo/finetune_hf.py`): `[gMASK] sop`, then per message
  `<|role|>` + encode("\\n") + encode(content); one `eos` ends the sample. The loss mask of each
  assistant message is shifted one position right, so the model learns the "\\n" after `<|assistant|>`,
  the reply, and the token that follows it: the next role token or the final `eos`
  (`reply_end: next_role`).
- Baichuan2 (baichuan-inc/Baichuan2 `fine-tune/fine-tune.py`): encode(system), then `195` + encode(user)
  and `196` + encode(assistant) per round, one final `eos`. The reply is trained, and the label at each
  user token that follows a reply is `eos` (`reply_end: eos`): the model learns to stop after answering.

Both recipes also put a label on position 0 (ChatGLM3: none; Baichuan2: `eos` at the first user token).
A causal LM never predicts position 0 (labels are shifted by one), so it is left at -100 here.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from self_model.core.errors import UserError
from self_model.template.chat_template import IGNORE_INDEX

if TYPE_CHECKING:
    from self_model.template.chat_template import ChatTemplate


class PieceEncoder:
    """Encodes markup (special tokens by id, the text between them on its own) and content with one tokenizer."""

    def __init__(self, template: ChatTemplate, tokenizer: Any):
        self.template = template
        self.tokenizer = tokenizer
        self.ids = template.special_token_ids(tokenizer)
        names = sorted(self.ids, key=len, reverse=True)
        self.split = re.compile("|".join(re.escape(n) for n in names)) if names else None
        self.bos, self.eos = tokenizer.bos_token or "", tokenizer.eos_token or ""

    def text(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def markup(self, text: str) -> list[int]:
        text = self.template.fill(text, self.bos, self.eos)
        if self.split is None:
            return self.text(text)
        out: list[int] = []
        last = 0
        for match in self.split.finditer(text):
            out += self.text(text[last:match.start()])
            out.append(self.ids[match.group()])
            last = match.end()
        return out + self.text(text[last:])


def encode_pieces(template: ChatTemplate, tokenizer: Any, messages: list[dict[str, Any]], mask_history: bool = False,
                  add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """ids and labels of a conversation, or (add_generation_prompt) the ids of an inference prompt."""
    enc = PieceEncoder(template, tokenizer)
    eos_id = tokenizer.eos_token_id
    turns = template.turns(messages)
    replies = [k for k, t in enumerate(turns) if t.role == "assistant"]
    gen = enc.markup(template.prompt_for_generation)
    ids = enc.markup(template.conversation_prefix)
    labels = [IGNORE_INDEX] * len(ids)
    reply_open = False  # the previous turn is a trained reply whose end the next token marks
    for k, turn in enumerate(turns):
        prefix, body, suffix = enc.markup(turn.prefix), enc.text(turn.body), enc.markup(turn.suffix)
        turn_ids = prefix + body + suffix
        turn_labels = [IGNORE_INDEX] * len(turn_ids)
        if reply_open and turn_ids:
            turn_labels[0] = turn_ids[0] if template.reply_end == "next_role" else eos_id
        trained = turn.role == "assistant" and (not mask_history or k == replies[-1])
        if trained:
            if prefix[: len(gen)] != gen:
                raise UserError(f"template '{template.name}': the generation prompt does not encode to the start "
                                "of the assistant prefix; check generation_prompt and assistant_prefix")
            end = len(turn_ids)
            if template.end_of_turn:  # train through the end-of-turn token, not what follows it in the suffix
                cut = turn.suffix.index(template.end_of_turn) + len(template.end_of_turn)
                end = len(prefix) + len(body) + len(enc.markup(turn.suffix[:cut]))
            turn_labels[len(gen):end] = turn_ids[len(gen):end]
        reply_open = trained and not template.end_of_turn
        ids += turn_ids
        labels += turn_labels
    if add_generation_prompt:
        return ids + gen, labels + [IGNORE_INDEX] * len(gen)
    last_trained = bool(replies) and turns[-1].role == "assistant"
    return ids + [eos_id], labels + [eos_id if last_trained else IGNORE_INDEX]
