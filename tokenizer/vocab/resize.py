"""Vocabulary extension, the model side: give the base model embedding and LM-head rows for the merged
tokenizer's new tokens.

Each new row starts at the mean of the rows of the token's sub-tokens: the base tokenizer's ids for the same text,
recorded by the merge (`vocab_extension.json`). A new token thus starts as what the model already reads there,
instead of noise. A token without sub-tokens falls back to the mean of all old rows. Tied and untied LM heads
are both handled. For old-token inputs the resized model's logits over the old vocabulary are those of the base
model (checked before saving).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from self_model.core.errors import UserError

logger = logging.getLogger("self_model")

LOGIT_TOLERANCE = 1e-4
PROBE_SHAPE = (2, 48)


def load_base_model(path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"base_model: cannot load a causal LM from '{path}': {exc}") from None
    return model.eval()


def check_pair(model: Any, base_tokens: int, model_path: str, tokenizer: str) -> int:
    """The model must be the one the base tokenizer belongs to: as many embedding rows as tokens, or more only as
    padding (rows a multiple of 64, at least 95% used, as Qwen2's 151936 for 151665 tokens). Returns the rows."""
    rows = model.get_input_embeddings().weight.shape[0]
    padding = rows > base_tokens and rows % 64 == 0 and base_tokens >= 0.95 * rows
    if rows != base_tokens and not padding:
        raise UserError(f"base_model {model_path} has {rows} embedding rows but the base tokenizer {tokenizer} has "
                        f"{base_tokens} tokens: they do not belong together. Set base_model to the model this "
                        "tokenizer came from (or base_tokenizer to this model's tokenizer).")
    return rows


def _probe(vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, PROBE_SHAPE, generator=generator)


@torch.no_grad()
def old_logits(model: Any, base_tokens: int) -> torch.Tensor:
    return model(_probe(base_tokens)).logits[..., :base_tokens].float()


@torch.no_grad()
def grow(model: Any, new_tokens: list[dict[str, Any]], base_tokens: int, target: int,
         pad_to_multiple_of: int | None) -> dict[str, Any]:
    """Resize (when the rows do not already cover `target` tokens) and set every new token's rows."""
    rows = model.get_input_embeddings().weight.shape[0]
    if target > rows:  # rows the base left as padding (Qwen2) take new tokens first
        model.resize_token_embeddings(target, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    inputs = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is None or output.weight.data_ptr() == inputs.data_ptr()
    tables = [inputs] if tied else [inputs, output.weight]
    means = [t[:base_tokens].float().mean(0) for t in tables]
    bias = None if tied or getattr(output, "bias", None) is None else output.bias
    fallback = []
    for tok in new_tokens:
        subs = [i for i in tok["sub_token_ids"] if 0 <= i < base_tokens]
        if not subs or len(subs) != len(tok["sub_token_ids"]):
            fallback.append(tok["token"])
        for table, mean in zip(tables, means):
            table[tok["id"]] = (table[subs].float().mean(0) if subs else mean).to(table.dtype)
        if bias is not None:
            bias[tok["id"]] = bias[subs].mean() if subs else bias[:base_tokens].mean()
    if fallback:
        logger.warning("%d new token(s) have no sub-tokens in the base vocabulary; their rows start at the mean of "
                       "all old rows: %s", len(fallback), fallback[:10])
    return {"rows_before": rows, "rows_after": inputs.shape[0], "tied_embeddings": tied,
            "from_sub_tokens": len(new_tokens) - len(fallback), "from_mean_of_all": len(fallback),
            "new_rows": [t["id"] for t in new_tokens]}


def check_logits(model: Any, before: torch.Tensor, base_tokens: int) -> float:
    """Largest difference between the base model's and the resized model's logits over the old vocabulary, for
    inputs made of old tokens; beyond LOGIT_TOLERANCE nothing is saved."""
    after = old_logits(model, base_tokens)
    diff = (after - before).abs().max().item()
    # fp32 gives the same logits up to summation order; bf16 / fp16 weights only up to their precision.
    half = model.get_input_embeddings().weight.dtype != torch.float32
    if diff > (1e-2 * max(1.0, before.abs().max().item()) if half else LOGIT_TOLERANCE):
        raise UserError(f"internal check failed, nothing was saved: the resized model's logits for old tokens differ "
                        f"from the base model's by {diff:.2e}. Please report.")
    return diff


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    import shutil

    for path in src.iterdir():
        if path.is_file():
            shutil.copy2(path, dst / path.name)
