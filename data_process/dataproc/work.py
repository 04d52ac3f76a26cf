"""What a worker process does with one batch of raw rows: parse, detect, convert, clean, filter, hash.

The result carries one status per row, in input order, so the main process can check formats per file,
count and report every removal, and write the kept rows in order whatever the number of workers.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from data_process.dataproc.clean import check_sample, clean_text, dedup_text
from data_process.dataproc.minhash import MinHasher
from data_process.dataproc.normalize import check_structure, content, convert, detect, map_texts
from data_process.dataproc.options import ProcessConfig
from data_process.dataproc.readers import Item
from self_model.core.rows import RowError, parse_json_line

SNIPPET = 300
OK, REJECTED, MALFORMED = "ok", "rejected", "malformed"


@dataclass
class RowStatus:
    file: int
    number: int
    status: str  # ok | rejected | malformed
    format: str | None = None
    rule: str = ""
    reason: str = ""
    payload: str = ""  # ok: the canonical record as JSON; otherwise the raw row (cut unless keep_rejected)


@dataclass
class BatchResult:
    rows: list[RowStatus] = field(default_factory=list)
    keys: np.ndarray = field(default_factory=lambda: np.empty((0, 2), np.uint64))  # per ok row: 128-bit hash
    chars: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # per ok row: content length
    signatures: np.ndarray | None = None  # per ok row, with near_dedup
    chars_changed: Counter = field(default_factory=Counter)  # per cleaning rule, over every row cleaned
    rows_changed: Counter = field(default_factory=Counter)  # per cleaning rule: rows it changed


_CFG: ProcessConfig | None = None
_HASHER: MinHasher | None = None


def init_worker(cfg: ProcessConfig) -> None:
    """Pool initializer: the config travels once per process, not once per batch."""
    global _CFG, _HASHER
    _CFG = cfg
    _HASHER = MinHasher(cfg.num_perm, cfg.ngram, cfg.ngram_unit, cfg.seed) if cfg.near_dedup else None


def process_batch(batch: list[Item]) -> BatchResult:
    cfg = _CFG
    if cfg is None:
        raise RuntimeError("init_worker was not called")
    result = BatchResult()
    keys: list[tuple[int, int]] = []
    chars: list[int] = []
    texts: list[str] = []
    for file_index, number, kind, payload in batch:
        status, record = _process_row(kind, payload, cfg, result)
        status.file, status.number = file_index, number
        result.rows.append(status)
        if record is not None:
            text = content(record)
            key_text = dedup_text(text)
            digest = xxhash.xxh3_128_intdigest(key_text.encode("utf-8"))
            keys.append((digest >> 64, digest & 0xFFFFFFFFFFFFFFFF))
            chars.append(len(text))
            texts.append(key_text)
    if keys:
        result.keys = np.array(keys, dtype=np.uint64)
        result.chars = np.array(chars, dtype=np.int64)
        if _HASHER is not None:
            result.signatures = _HASHER.signatures(texts)
    return result


def _raw(kind: str, payload: Any, keep: bool) -> str:
    if kind == "json":
        text = payload.decode("utf-8", errors="replace").rstrip("\r\n")
    elif kind == "row":
        text = json.dumps(payload, ensure_ascii=False, default=str)
    else:
        text = str(payload)
    return text if keep else text[:SNIPPET]


def _process_row(kind: str, payload: Any, cfg: ProcessConfig,
                 result: BatchResult) -> tuple[RowStatus, dict[str, Any] | None]:
    """The row's status, and its cleaned canonical record when it is kept; the characters cleaning changed are
    added to `result` (for every row cleaned, also those a filter then removes)."""
    keep = cfg.keep_rejected
    if kind == "error":
        return RowStatus(0, 0, MALFORMED, reason=payload), None
    fmt = None
    try:
        if kind == "text":
            row: Any = {cfg.text_field: payload}
            fmt = "text"
        else:
            row = parse_json_line(payload) if kind == "json" else payload
            if isinstance(row, RowError):
                return RowStatus(0, 0, MALFORMED, reason=str(row), payload=_raw(kind, payload, keep)), None
            if not isinstance(row, dict):
                raise RowError(f"expected an object per row, got {type(row).__name__}")
            fmt = detect(row, cfg.text_field) if cfg.format == "auto" else cfg.format
        record = convert(fmt, row, cfg.text_field)
        changed: dict[str, int] = {}
        record = map_texts(record, lambda s: clean_text(s, cfg, changed))
        result.chars_changed.update(changed)
        result.rows_changed.update(changed.keys())
        rejected = check_sample(record, cfg)
        if rejected:
            return RowStatus(0, 0, REJECTED, fmt, rejected[0], rejected[1], _raw(kind, payload, keep)), None
        check_structure(fmt, record)
    except (RowError, KeyError) as exc:
        reason = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        if cfg.format != "auto" and isinstance(exc, KeyError):
            reason += f" (is this file really '{cfg.format}'? --format auto detects the format)"
        return RowStatus(0, 0, MALFORMED, fmt, reason=reason, payload=_raw(kind, payload, keep)), None
    return RowStatus(0, 0, OK, fmt, payload=json.dumps(record, ensure_ascii=False)), record
