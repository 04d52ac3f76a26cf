"""SFT samples: conversations -> input_ids + labels, length statistics, and the batch collators."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from self_model.core.conversations import load_conversations
from self_model.core.dataset_mix import mix_sources, sources
from self_model.core.errors import UserError
from self_model.core.rows import length_stats
from self_model.fine_tuning.config import SFTDataConfig
from self_model.template.chat_template import IGNORE_INDEX
from self_model.template.resolve import Template

logger = logging.getLogger("self_model")


@dataclass
class TokenizeReport:
    """What tokenization did to the data: reported before training and written into the run folder."""

    rows: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    lengths: list[int] = field(default_factory=list)
    trained_tokens: int = 0
    # The first sample of each data format, for --dry-run (not part of the summary).
    examples: dict[str, dict[str, Any]] = field(default_factory=dict)
    # data.datasets: rows per data set and its share of the mix (core.dataset_mix).
    mix: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"rows_in": self.rows, "rows_out": len(self.lengths), "truncated": self.truncated,
                "dropped_too_long": self.dropped_too_long, "dropped_no_trainable_tokens": self.dropped_no_target,
                "tokens": length_stats(self.lengths), "trained_tokens": self.trained_tokens,
                **({"mix": self.mix} if self.mix else {})}


def tokenize_conversations(samples: list[dict[str, Any]], tokenizer: Any, template: Template,
                           data: SFTDataConfig) -> tuple[list[dict[str, list[int]]], TokenizeReport]:
    encoded = [template.encode(tokenizer, s["messages"], data.mask_history, s.get("tools"))
               for s in samples]
    return apply_length_policy(encoded, data)


def apply_length_policy(encoded: Any, data: SFTDataConfig) -> tuple[list[dict[str, list[int]]], TokenizeReport]:
    """Truncate or drop samples over max_length, drop those left without a trained token, and count both."""
    report = TokenizeReport(rows=len(encoded))
    rows = []
    for ids, labels in encoded:
        if len(ids) > data.max_length:
            if data.truncation == "drop":
                report.dropped_too_long += 1
                continue
            report.truncated += 1
            ids, labels = ids[: data.max_length], labels[: data.max_length]
        trained = sum(1 for label in labels if label != IGNORE_INDEX)
        if trained == 0:
            report.dropped_no_target += 1  # the prompt alone fills max_length: nothing left to learn from
            continue
        report.lengths.append(len(ids))
        report.trained_tokens += trained
        rows.append({"input_ids": ids, "labels": labels})
    return rows, report


def build_sft_dataset(files: str | list[str] | None, tokenizer: Any, template: Template,
                      data: SFTDataConfig, limit: int | None = None) -> tuple[Any, TokenizeReport]:
    """Load, validate and tokenize; large files are tokenized in parallel with datasets.map."""
    from datasets import Dataset

    samples, mix = read_conversations(files, data, template.check_roles)
    if limit:
        samples = samples[:limit]
    num_proc = data.num_proc if data.num_proc is not None else (min(os.cpu_count() or 1, 8) if len(samples) > 20000
                                                                 else None)
    if num_proc and num_proc > 1:
        # Parallel path: each worker tokenizes a shard; the report is rebuilt from the per-row results.
        shard = Dataset.from_dict({"messages": [json.dumps(s["messages"], ensure_ascii=False) for s in samples],
                                   "tools": [json.dumps(s.get("tools"), ensure_ascii=False) for s in samples]})

        def encode_batch(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
            out = [template.encode(tokenizer, json.loads(m), data.mask_history, json.loads(t))
                   for m, t in zip(batch["messages"], batch["tools"], strict=True)]
            return {"input_ids": [o[0] for o in out], "labels": [o[1] for o in out]}

        encoded = shard.map(encode_batch, batched=True, num_proc=num_proc, remove_columns=["messages", "tools"])
        rows, report = apply_length_policy(list(zip(encoded["input_ids"], encoded["labels"], strict=True)), data)
    else:
        rows, report = tokenize_conversations(samples, tokenizer, template, data)
    if not rows:
        raise UserError(f"no trainable samples left in {files}: {report.summary()}")
    for sample in samples:
        report.examples.setdefault(sample.get("format", "?"), sample)
    report.mix = mix
    return Dataset.from_list(rows), report


def read_conversations(files: str | list[str] | None, data: SFTDataConfig, check: Any
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of `files`, or the mix of `data.datasets` (each read in its registry format); and the mix plan."""
    if files:
        return load_conversations(files, data.format, check=check), []
    return mix_sources(sources(data.datasets or [], data.dataset_registry),
                       lambda src: load_conversations(src.files, src.entry.format if src.entry.format != "auto"
                                                      else data.format, check=check), data.mix, data.mix_seed)


class PaddingCollator:
    """Right-pads input_ids with pad_token_id and labels with -100; builds the attention mask."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for f in features:
            pad = longest - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


# The batch key that carries, for a padded batch, which (row, position) pairs have a trained next token.
TRAINED_POSITIONS = "trained_positions"


class TrainedLogitsOnly:
    """Wraps a collator so the model computes LM-head logits only where a label is trained.

    Prompt, system and padding positions never enter the loss, yet the LM head (hidden x vocabulary, the
    largest matmul of a small model and a large share of a big one) and its logits would be computed for
    them. The batch gets `shift_labels` holding only the trained positions' next tokens; transformers'
    causal-LM loss uses them as they are and the Trainer counts them for its token-level loss normalization,
    so the loss value is unchanged. Which hidden states reach the head:
    - one row (packing, or a batch of one): `logits_to_keep`, the trained positions, which the model's own
      forward selects;
    - a padded batch: `logits_to_keep` selects whole columns, and a column trained in one row is usually
      prompt or padding in the others (several times the trained positions at batch 8). The batch gets
      TRAINED_POSITIONS instead, a (rows x positions) mask that `keep_trained_hidden_states` applies at the
      head's input.
    """

    def __init__(self, collator: Any):
        self.collator = collator

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        labels = batch["labels"]
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        trained = shifted != IGNORE_INDEX
        if labels.shape[0] == 1:
            keep = trained[0].nonzero().squeeze(-1)
            batch["logits_to_keep"] = keep
            batch["shift_labels"] = shifted[:, keep].contiguous()
        else:
            batch[TRAINED_POSITIONS] = trained
            batch["shift_labels"] = shifted[trained].unsqueeze(0)
        return batch


def make_collator(tokenizer: Any, packing: bool, trained_logits_only: bool = False) -> Any:
    """Packing: transformers' DataCollatorWithFlattening concatenates the batch into one row with positions
    restarting at 0 for each sample and no attention mask; the model then builds a block-diagonal causal
    mask from the positions, so samples never attend to each other, and the first label of every sample is
    -100, so no sample learns to predict the next one.

    trained_logits_only: the model must have gone through `keep_trained_hidden_states` first."""
    if packing:
        from transformers import DataCollatorWithFlattening

        # The sample boundaries (cu_seq_lens_*) let per-document attention skip the block-diagonal mask.
        collator: Any = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                                   return_flash_attn_kwargs=True)
    else:
        collator = PaddingCollator(tokenizer.pad_token_id)
    return TrainedLogitsOnly(collator) if trained_logits_only else collator


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward takes a tensor of positions (transformers' own causal LMs do; remote
    code such as ChatGLM3's may not)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def keep_trained_hidden_states(model: Any) -> bool:
    """Make `model` honour TrainedLogitsOnly's batches; False (batches must then be built without it) for a
    model whose forward is not transformers' causal-LM forward.

    Two forward pre-hooks: one on the outermost module takes TRAINED_POSITIONS out of the call's keyword
    arguments (so it never reaches attention or the loss), one on the LM head applies it to the hidden states,
    turning (rows, positions, hidden) into (1, trained positions, hidden) so the logits line up with
    `shift_labels`. Hooks rather than a custom compute_loss: the model is still called as one module, so
    DDP's gradient sync, DeepSpeed ZeRO-3's parameter gathering and FSDP2's unsharding run as they always do.
    """
    if not accepts_logits_to_keep(model):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if head is None:
        return False
    if getattr(model, "_keeps_trained_hidden_states", False):
        return True
    pending: dict[str, torch.Tensor] = {}

    def take_mask(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        mask = kwargs.pop(TRAINED_POSITIONS, None)
        if mask is not None:
            pending["mask"] = mask
        return args, kwargs

    def apply_mask(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        mask = pending.pop("mask", None)
        if mask is None:
            return None
        hidden = args[0]
        return (hidden[mask.to(hidden.device)].unsqueeze(0), *args[1:])

    model.register_forward_pre_hook(take_mask, with_kwargs=True)
    head.register_forward_pre_hook(apply_mask)
    model._keeps_trained_hidden_states = True
    return True


def render_marked(tokenizer: Any, ids: list[int], labels: list[int], open_mark: str = "[[",
                  close_mark: str = "]]") -> str:
    """The sample as text with each trained span wrapped in [[ ]], for --dry-run and tests.

    A trained position whose label is not its input token (Baichuan2 learns eos where the next user token
    stands) is shown as [[input→label]].
    """
    out: list[str] = []
    run: list[int] = []
    trained = None
    for tok, label in zip(ids, labels, strict=True):
        is_trained = label != IGNORE_INDEX
        if is_trained and label != tok:
            if run:
                out.append(f"{open_mark}{tokenizer.decode(run)}{close_mark}" if trained else tokenizer.decode(run))
            out.append(f"{open_mark}{tokenizer.decode([tok])}→{tokenizer.decode([label])}{close_mark}")
            run, trained = [], None
            continue
        if trained is not None and is_trained != trained:
            text = tokenizer.decode(run)
            out.append(f"{open_mark}{text}{close_mark}" if trained else text)
            run = []
        trained = is_trained
        run.append(tok)
    if run:
        text = tokenizer.decode(run)
        out.append(f"{open_mark}{text}{close_mark}" if trained else text)
    return "".join(out)
