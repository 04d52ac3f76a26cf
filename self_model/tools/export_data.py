"""The texts an export works with, taken from the run's own data: fixed prompts for the merge check, held-out text
for perplexity, calibration rows for GPTQ. `run_config.yaml` (in final/, or the run folder of a checkpoint) names
the files: `data.train_file` / `data.eval_file` (CPT, SFT, DPO) or `ppo.train_file` / `ppo.eval_file` (PPO, GRPO)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from self_model.core.conversations import FORMATS, detect_format
from self_model.core.corpus import resolve_corpus
from self_model.core.dataset_mix import DatasetRef, sources
from self_model.core.errors import UserError
from self_model.core.preferences import FORMATS as PREFERENCE_FORMATS
from self_model.core.preferences import detect_preference_format
from self_model.core.prompt_rows import convert_row
from self_model.core.rows import RowError, iter_rows

logger = logging.getLogger("self_model")
RUN_CONFIG = "run_config.yaml"


def read_run_config(folder: str | Path) -> dict[str, Any]:
    """run_config.yaml of a result folder (final/ and exports hold a copy; checkpoint-N/ uses its run's)."""
    folder = Path(folder)
    for path in (folder / RUN_CONFIG, folder.parent / RUN_CONFIG):
        if path.is_file() and (path.parent == folder or re.fullmatch(r"checkpoint-\d+", folder.name)):
            return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {}


@dataclass
class RunData:
    """The files a run trained and evaluated on, and what kind of text they hold."""

    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    text_fields: list[str] = field(default_factory=lambda: ["text"])
    plain_text: bool = False  # continued pretraining: documents, not conversations


def _files(value: Any) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def run_data(run_config: dict[str, Any], stage: str | None = None) -> RunData:
    """The data files a run's config names (those still on disk). rlhf.yaml holds DPO's `data:` and PPO / GRPO's
    `ppo:` side by side: the run's stage says which it trained on."""
    data, ppo = run_config.get("data") or {}, run_config.get("ppo") or {}
    found = RunData(text_fields=list(data.get("text_fields") or ["text"]),
                    plain_text="objective" in run_config or "block_size" in data)
    first, second = (ppo, data) if stage in ("grpo", "ppo") else (data, ppo)
    found.train = (_files(first.get("train_file")) or _named_files(first) or _files(second.get("train_file"))
                   or _named_files(second))
    found.eval = _files(first.get("eval_file")) or _files(second.get("eval_file"))
    if found.plain_text:  # a corpus entry may be a folder or a glob
        found.train, found.eval = [str(p) for p in resolve_corpus(found.train)], [str(p) for p in
                                                                                  resolve_corpus(found.eval)]
    for name in ("train", "eval"):
        missing = [f for f in getattr(found, name) if not Path(f).exists()]
        if missing:
            logger.warning("the run's %s data %s is not here (run from the folder the run was started in, or set "
                           "check.data_file / quantize.eval_file)", name, missing)
            setattr(found, name, [f for f in getattr(found, name) if Path(f).exists()])
    return found


def _named_files(section: dict[str, Any]) -> list[str]:
    """The local files of a section's `datasets:` (names of its registry, core.dataset_mix); hub data sets are not
    fetched for an export's check prompts."""
    if not section.get("datasets"):
        return []
    registry = section.get("dataset_registry") or "config/datasets.yaml"
    try:
        named = sources([DatasetRef(**ref) for ref in section["datasets"]], registry)
    except (UserError, OSError, TypeError, KeyError) as exc:  # the registry moved or changed since the run
        logger.warning("the run's data sets could not be resolved from %s: %s", registry, exc)
        return []
    return [f for src in named if not src.entry.hub for f in src.files]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        if value.strip():
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def row_messages(row: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The conversation of a row, read by the trainers' own converters: an SFT row (any registered format), a
    preference pair (prompt + chosen) or a GRPO prompt (prompt + reference answer); None for anything else."""
    for convert in (_conversation, _preference_pair, _prompt_and_answer):
        try:
            return convert(row)
        except (RowError, KeyError, TypeError, ValueError):
            continue
    return None


def _conversation(row: dict[str, Any]) -> list[dict[str, Any]]:
    return FORMATS[detect_format(row)].convert(row)


def _preference_pair(row: dict[str, Any]) -> list[dict[str, Any]]:
    prompt, chosen, _ = PREFERENCE_FORMATS[detect_preference_format(row)].convert(row)
    return [*prompt, chosen]


def _prompt_and_answer(row: dict[str, Any]) -> list[dict[str, Any]]:
    prompt, answer = convert_row(row, None)
    return [*prompt, {"role": "assistant", "content": answer}]


def render_row(row: Any, tokenizer: Any, text_fields: list[str]) -> str:
    """One row as the model saw it: a conversation through the tokenizer's chat template, else its text."""
    if not isinstance(row, dict):
        return ""
    parts = [row[k] for k in text_fields if isinstance(row.get(k), str)]
    if parts:
        return "\n".join(parts)
    messages = row_messages(row)
    if messages and getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # noqa: BLE001 - a template may reject a turn order; the row's plain text still serves
            pass
    return "\n".join(m["content"] for m in messages if isinstance(m.get("content"), str)) if messages else \
        "\n".join(_strings(row))


def read_texts(files: list[str], tokenizer: Any, text_fields: list[str], limit: int | None = None) -> list[str]:
    """The first `limit` texts of the files: .txt lines, .jsonl / .json rows rendered (`render_row`)."""
    texts: list[str] = []
    for name in files:
        path = Path(name)
        if path.suffix == ".txt":
            with path.open(encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if line.strip():
                        texts.append(line.strip())
                    if limit is not None and len(texts) >= limit:
                        break
        else:
            for _, row in iter_rows(path):
                if not isinstance(row, RowError) and (text := render_row(row, tokenizer, text_fields).strip()):
                    texts.append(text)
                if limit is not None and len(texts) >= limit:
                    break
        if limit is not None and len(texts) >= limit:
            return texts[:limit]
    return texts


def check_prompts(data: RunData, override: str | list[str] | None, tokenizer: Any,
                  count: int) -> tuple[list[str], list[str]]:
    """(prompts, files): the first `count` rows of check.data_file, else of the run's training data."""
    files = _files(override) or data.train or data.eval
    if not files:
        raise UserError("check: the run's config names no data file that is here, so there are no prompts to compare "
                        "the merged model on; set check.data_file to a file of the run's data (.jsonl or .txt)")
    texts = read_texts(files, tokenizer, data.text_fields, count)
    if not texts:
        raise UserError(f"check: no text in {files}; set check.data_file to a file of the run's data")
    return texts, files


def held_out_texts(data: RunData, override: str | list[str] | None,
                   tokenizer: Any) -> tuple[list[str], dict[str, Any]]:
    """(texts, where they came from): quantize.eval_file, else the run's eval file, else its training data."""
    files, held_out = _files(override) or data.eval, True
    if not files:
        files, held_out = data.train, False
        logger.warning("the run has no eval file: perplexity is measured on its training data (set quantize.eval_file "
                       "to held-out text)")
    if not files:
        raise UserError("quantize: no text to measure perplexity on (the run's data files are not here); set "
                        "quantize.eval_file")
    return read_texts(files, tokenizer, data.text_fields), {"files": files, "held_out": held_out}
