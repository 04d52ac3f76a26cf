"""Continued pretraining data: documents -> token blocks, cached once or streamed.

Causal LM (`objective: clm`): each document is tokenized (with the tokenizer's own special tokens, e.g. a
BOS) and ends with EOS; the token stream is cut into `block_size` blocks, so a block may hold the end of one
document and the start of the next (they are separated by EOS). Masked LM (`objective: mlm`): each document
is `[CLS] ... [SEP]` as the tokenizer encodes it; blocks are cut the same way. Grouping works on batches of
GROUP_BATCH documents (as transformers' run_clm.py does): the tokens left after the last full block of a batch
are dropped or kept in a padded block (`data.remainder`), and counted in the report.

Map-style data is tokenized once with `datasets.map` (in parallel above 20,000 documents) and saved under
`<cache_dir>/<fingerprint>/`; the fingerprint covers each file's path, size and mtime, the tokenizer, the
objective, block_size, remainder and text_fields, so a second run with the same inputs skips tokenization.
`data.streaming: true` reads, tokenizes and groups on the fly (an `IterableDataset`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from self_model.core.corpus import CorpusStats, file_signature, iter_documents, read_strict, resolve_corpus
from self_model.core.dataset_mix import Source, mix_sources, sources
from self_model.core.errors import DataError, UserError
from self_model.pretrain.config import PretrainConfig
from self_model.template.chat_template import IGNORE_INDEX

logger = logging.getLogger("self_model")

CACHE_FORMAT = 1  # bump when the block layout changes, so old caches are not reused
GROUP_BATCH = 1000  # documents grouped together; at most one remainder per batch
PARALLEL_ABOVE = 20_000  # documents; below this, extra processes cost more than they save


def cache_root(cfg: PretrainConfig) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    return Path(os.environ.get("SELF_MODEL_CACHE", Path.home() / ".cache" / "self_model")) / "pretrain"


@dataclass
class BlockReport:
    """What tokenization and grouping did: logged, written to data_report.json, printed by --dry-run."""

    files: list[str] = field(default_factory=list)
    corpus: dict[str, Any] = field(default_factory=dict)
    tokens: int = 0
    block_size: int = 0
    blocks: int = 0
    remainder: str = "drop"
    dropped_tokens: int = 0
    padded_blocks: int = 0
    padding_tokens: int = 0
    cache: str | None = None
    from_cache: bool = False
    streaming: bool = False

    def summary(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        if self.streaming:
            return f"{len(self.files)} file(s), streamed in blocks of {self.block_size} tokens"
        rest = (f"remainders dropped: {self.dropped_tokens} tokens" if self.remainder == "drop" else
                f"remainders padded: {self.padded_blocks} block(s), {self.padding_tokens} padding tokens")
        return (f"{self.corpus.get('documents', '?')} documents in {len(self.files)} file(s), {self.tokens} tokens -> "
                f"{self.blocks} blocks of {self.block_size}; {rest}"
                + ("; tokenized earlier (cache)" if self.from_cache else ""))


def check_tokenizer(tokenizer: Any, cfg: PretrainConfig) -> None:
    if cfg.objective == "clm" and tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer_name_or_path: '{cfg.tokenizer_path}' has no eos token, which separates "
                        "documents in causal-LM pretraining; for a BERT-style encoder set objective: mlm")
    if cfg.objective == "mlm" and tokenizer.mask_token is None:
        raise UserError(f"objective: mlm needs a tokenizer with a mask token; '{cfg.tokenizer_path}' has none "
                        "(a decoder-only model trains with objective: clm)")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
             len(tokenizer)]
    return hashlib.sha256((body + json.dumps(extra)).encode("utf-8")).hexdigest()


def corpus_fingerprint(files: list[Path], tokenizer: Any, cfg: PretrainConfig) -> str:
    key = {"format": CACHE_FORMAT, "files": file_signature(files), "tokenizer": tokenizer_fingerprint(tokenizer),
           "objective": cfg.objective, "block_size": cfg.data.block_size, "remainder": cfg.data.remainder,
           "text_fields": cfg.data.text_fields, "group_batch": GROUP_BATCH}
    if cfg.data.datasets:  # a mix: which data sets, their weights and caps, the strategy and the seed
        key["mix"] = [json.dumps(asdict(r)) for r in cfg.data.datasets] + [cfg.data.mix, str(cfg.data.mix_seed)]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:24]


def make_tokenize(tokenizer: Any, objective: str) -> Callable[[dict[str, list[str]]], dict[str, list[Any]]]:
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
        if objective == "mlm":
            enc = tokenizer(batch["text"], return_special_tokens_mask=True, verbose=False)
            out = {"input_ids": enc["input_ids"], "special_tokens_mask": enc["special_tokens_mask"]}
        else:
            ids = tokenizer(batch["text"], verbose=False)["input_ids"]
            out = {"input_ids": [x if x and x[-1] == eos else x + [eos] for x in ids]}
        out["n_tokens"] = [len(x) for x in out["input_ids"]]
        return out

    return tokenize


def make_grouper(block_size: int, remainder: str, pad_id: int, objective: str
                 ) -> Callable[[dict[str, list[Any]]], dict[str, list[Any]]]:
    """Concatenate a batch of documents and cut it into blocks: input_ids, attention_mask, and labels (clm:
    the inputs, -100 on padding; the model shifts them) or special_tokens_mask (mlm: never masked)."""

    def group(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        keys = [k for k in ("input_ids", "special_tokens_mask") if k in batch]
        stream = {k: list(chain.from_iterable(batch[k])) for k in keys}
        total = len(stream["input_ids"])
        full = total - total % block_size
        out = {k: [v[i:i + block_size] for i in range(0, full, block_size)] for k, v in stream.items()}
        real = [block_size] * len(out["input_ids"])
        if total > full and remainder == "pad":
            pad = block_size - (total - full)
            out["input_ids"].append(stream["input_ids"][full:] + [pad_id] * pad)
            if "special_tokens_mask" in out:
                out["special_tokens_mask"].append(stream["special_tokens_mask"][full:] + [1] * pad)
            real.append(total - full)
        out["attention_mask"] = [[1] * n + [0] * (block_size - n) for n in real]
        if objective == "clm":
            out["labels"] = [ids[:n] + [IGNORE_INDEX] * (block_size - n) for ids, n in zip(out["input_ids"], real)]
        out["n_real"] = real
        return out

    return group


def load_blocks(value: str | list[str], tokenizer: Any, cfg: PretrainConfig, role: str,
                streaming: bool = False) -> tuple[Any, BlockReport]:
    """The blocks of `data.<role>_file` (or of the `data.datasets` mix): streamed, loaded from the cache, or tokenized
    now and cached."""
    mixed = not value and bool(cfg.data.datasets)
    srcs = sources(cfg.data.datasets, cfg.data.dataset_registry) if mixed else []
    files = [Path(f) for src in srcs for f in src.files] if mixed else resolve_corpus(value)
    if streaming:
        return stream_blocks(files, tokenizer, cfg, role)
    fingerprint = corpus_fingerprint(files, tokenizer, cfg)
    target = cache_root(cfg) / fingerprint
    if (target / "block_report.json").is_file():
        from datasets import load_from_disk

        report = BlockReport(**json.loads((target / "block_report.json").read_text(encoding="utf-8")))
        report.from_cache = True
        logger.info("%s data: tokenized blocks found in %s; tokenization skipped", role, target)
        return load_from_disk(str(target)), report
    return tokenize_and_cache(files, tokenizer, cfg, role, target, srcs)


def mixed_documents(srcs: list[Source], cfg: PretrainConfig) -> tuple[list[str], list[dict[str, Any]]]:
    """The documents of each data set (its `columns.text`, else data.text_fields), mixed (core.dataset_mix)."""
    def read(src: Source) -> list[str]:
        stats = CorpusStats()
        fields = [src.entry.columns["text"]] if "text" in src.entry.columns else cfg.data.text_fields
        texts = list(iter_documents([Path(f) for f in src.files], fields, stats))
        stats.raise_if_bad(f"data set '{src.name}'")
        return texts

    return mix_sources(srcs, read, cfg.data.mix, cfg.data.mix_seed)


def tokenize_and_cache(files: list[Path], tokenizer: Any, cfg: PretrainConfig, role: str,
                       target: Path, srcs: list[Source] | None = None) -> tuple[Any, BlockReport]:
    from datasets import Dataset, Features, Value, load_from_disk

    data = cfg.data
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{target.name}.", suffix=".work", dir=target.parent))
    stats = CorpusStats()
    texts, plan = mixed_documents(srcs, cfg) if srcs else (None, [])
    try:
        def documents() -> Any:
            for text in texts if texts is not None else iter_documents(files, data.text_fields, stats):
                yield {"text": text}

        try:
            texts = Dataset.from_generator(documents, features=Features({"text": Value("string")}),
                                           cache_dir=str(work / "hf"))
        except Exception:
            stats.raise_if_bad(f"{role} data")  # the generator found no rows: the real problem is in stats
            raise
        stats.raise_if_bad(f"{role} data")
        num_proc = data.num_proc if data.num_proc is not None else (
            min(os.cpu_count() or 1, 8) if stats.documents > PARALLEL_ABOVE else None)
        tokenized = texts.map(make_tokenize(tokenizer, cfg.objective), batched=True, num_proc=num_proc,
                              remove_columns=["text"], new_fingerprint=f"{target.name}-tokens",
                              desc=f"tokenizing {role} data")
        tokens = sum(tokenized["n_tokens"])
        where = ", ".join(map(str, files))
        if tokens < data.block_size:
            raise DataError([f"{where}: the {role} corpus has {tokens} tokens, fewer than one block "
                             f"(data.block_size: {data.block_size}); add text or lower data.block_size"])
        grouper = make_grouper(data.block_size, data.remainder, tokenizer.pad_token_id, cfg.objective)
        # One process: grouping is cheap next to tokenizing, and shards would each leave a remainder of their
        # own, so the blocks would depend on num_proc.
        blocks = tokenized.map(grouper, batched=True, batch_size=GROUP_BATCH,
                               remove_columns=tokenized.column_names, new_fingerprint=f"{target.name}-blocks",
                               desc=f"grouping {role} data into blocks of {data.block_size}")
        real = list(blocks["n_real"])
        if data.block_size not in real:
            raise DataError([f"{where}: no {GROUP_BATCH:,} consecutive documents of the {role} corpus fill one block "
                             f"(data.block_size: {data.block_size}); lower data.block_size"])
        kept = sum(real)
        summary = {**stats.summary(), "documents": len(texts), "mix": plan} if texts is not None else stats.summary()
        report = BlockReport(files=[str(f) for f in files], corpus=summary, tokens=tokens,
                             block_size=data.block_size, blocks=len(real), remainder=data.remainder,
                             dropped_tokens=tokens - kept, padded_blocks=sum(1 for n in real if n < data.block_size),
                             padding_tokens=len(real) * data.block_size - kept, cache=str(target))
        partial = work / "blocks"
        blocks.remove_columns("n_real").save_to_disk(str(partial))
        (partial / "block_report.json").write_text(json.dumps(report.summary(), indent=2, ensure_ascii=False),
                                                   encoding="utf-8")
        try:
            partial.rename(target)  # atomic: a crash never leaves a cache entry that looks complete
        except OSError:
            if not (target / "block_report.json").is_file():  # another process won the race: use its copy
                raise
        logger.info("%s data: %s; cached in %s", role, report.line(), target)
        return load_from_disk(str(target)), report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def stream_blocks(files: list[Path], tokenizer: Any, cfg: PretrainConfig, role: str) -> tuple[Any, BlockReport]:
    """An IterableDataset read, tokenized and grouped as training consumes it (bad rows raise when reached)."""
    from datasets import Features, IterableDataset, Value

    data = cfg.data
    texts = IterableDataset.from_generator(read_strict, features=Features({"text": Value("string")}),
                                           gen_kwargs={"files": files, "text_fields": data.text_fields})
    tokenized = texts.map(make_tokenize(tokenizer, cfg.objective), batched=True, remove_columns=["text"])
    columns = ["input_ids", "n_tokens"] + (["special_tokens_mask"] if cfg.objective == "mlm" else [])
    grouper = make_grouper(data.block_size, data.remainder, tokenizer.pad_token_id, cfg.objective)
    blocks = tokenized.map(grouper, batched=True, batch_size=GROUP_BATCH, remove_columns=columns)
    first = next(iter(blocks), None)  # reads the first GROUP_BATCH documents only
    if first is None or first["n_real"] < data.block_size:
        raise DataError([f"{', '.join(map(str, files))}: the {role} corpus yields no full block of "
                         f"data.block_size: {data.block_size} tokens; add text or lower data.block_size"])
    blocks = blocks.remove_columns(["n_real"])
    report = BlockReport(files=[str(f) for f in files], block_size=data.block_size, remainder=data.remainder,
                         streaming=True)
    logger.info("%s data: %s", role, report.line())
    return blocks, report
