"""The processing run: read and clean in parallel (pass 1), decide duplicates, write the split (pass 2).

Pass 1 streams batches of raw rows to worker processes and appends what comes back, in input order, to a
stage file of cleaned canonical rows plus a few fixed-width numbers per row (a 128-bit content hash, the
length, the MinHash signature on disk). Duplicates are then decided from those numbers alone, and pass 2
streams the stage file once more into train / validation. Memory grows with the number of rows (about
40 bytes each, plus 8 per LSH band), never with their text.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from data_process.dataproc import report as reporting
from data_process.dataproc.dedup import NearDuplicates, exact_representatives, near_duplicates
from data_process.dataproc.minhash import optimal_bands
from data_process.dataproc.normalize import KIND_OF, content
from data_process.dataproc.options import ProcessConfig
from data_process.dataproc.readers import Inputs, Item, expand_inputs, iter_batches
from data_process.dataproc.work import MALFORMED, OK, BatchResult, RowStatus, init_worker, process_batch
from self_model.core.errors import DataError, UserError

logger = logging.getLogger("self_model")
OUTPUTS = ("train.jsonl", "validation.jsonl", "report.json", "report.md", "lengths.png", "rejected.jsonl")
MAX_SHOWN = 10


@dataclass
class Collected:
    """What pass 1 keeps in memory about the rows that survived cleaning (row i = line i of the stage file)."""

    inputs: Inputs
    kind: str | None = None
    rows_ok: int = 0
    offsets: list[int] = field(default_factory=lambda: [0])
    files: list[np.ndarray] = field(default_factory=list)
    numbers: list[np.ndarray] = field(default_factory=list)
    keys: list[np.ndarray] = field(default_factory=list)
    chars: list[np.ndarray] = field(default_factory=list)
    removed: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    malformed: list[str] = field(default_factory=list)
    first_of_kind: str = ""  # where the kind of this run was decided, for the error on a file of another kind

    def loc(self, file_index: int, number: int) -> str:
        return self.inputs.loc(file_index, number)


def check_output_dir(cfg: ProcessConfig) -> None:
    present = [name for name in OUTPUTS if (cfg.out_dir / name).exists()]
    if present and not cfg.overwrite:
        raise UserError(f"{cfg.out_dir} already holds a previous result ({', '.join(present)}); pass --overwrite "
                        "to replace it, or choose another --output_dir / --subdir")


def run(cfg: ProcessConfig) -> dict[str, Any]:
    """Process `cfg.input` into `cfg.out_dir`; returns the report. Raises UserError / DataError."""
    check_output_dir(cfg)
    tokenizer = reporting.load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    inputs = expand_inputs(cfg.inputs)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".process_data-", dir=cfg.output_dir))
    try:
        started = time.perf_counter()
        with open(work / "rejected.jsonl", "w", encoding="utf-8") if cfg.keep_rejected else _null() as rejected:
            collected = collect(cfg, inputs, work, rejected)
            read_s = time.perf_counter() - started
            _check_collected(cfg, collected)
            result = write_split(cfg, collected, work, rejected, tokenizer)
        result["timing"] = {"read_clean_s": round(read_s, 2),
                            "dedup_split_s": round(time.perf_counter() - started - read_s, 2),
                            "workers": cfg.workers}
        report = reporting.build(cfg, collected, result)
        reporting.write(work, report, result["lengths"])
        if not result["kept"]:
            raise UserError("no rows left after cleaning and deduplication; nothing was written:\n"
                            + reporting.markdown(report))
        _publish(work, cfg)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _results(cfg: ProcessConfig, batches: Iterable[list[Item]]) -> Iterator[BatchResult]:
    """Batch results in input order; at most 2 batches per worker in flight, so a huge file never piles up."""
    if cfg.workers == 1:
        init_worker(cfg)
        yield from map(process_batch, batches)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ctx.Pool(cfg.workers, initializer=init_worker, initargs=(cfg,)) as pool:
        pending: deque[Any] = deque()
        for batch in batches:
            pending.append(pool.apply_async(process_batch, (batch,)))
            if len(pending) >= 2 * cfg.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def collect(cfg: ProcessConfig, inputs: Inputs, work: Path, rejected: IO[str] | None) -> Collected:
    """Pass 1: every row parsed, converted, cleaned and filtered; kept rows to work/stage.jsonl."""
    from tqdm.auto import tqdm

    out = Collected(inputs)
    with open(work / "stage.jsonl", "wb") as stage, open(work / "signatures.u32", "wb") as sigs, \
            tqdm(desc="read + clean", unit=" rows", disable=None) as bar:
        for result in _results(cfg, iter_batches(inputs, cfg.batch_size)):
            keep = np.ones(len(result.keys), dtype=bool)
            ok_index = 0
            for status in result.rows:
                is_ok = status.status == OK
                _take_row(cfg, out, status, rejected)
                if is_ok:
                    if status.status == OK:
                        line = status.payload.encode("utf-8") + b"\n"
                        stage.write(line)
                        out.offsets.append(out.offsets[-1] + len(line))
                    else:
                        keep[ok_index] = False  # turned malformed: the file mixes formats
                    ok_index += 1
            rows = [s for s in result.rows if s.status == OK]
            out.files.append(np.array([s.file for s in rows], dtype=np.int32))
            out.numbers.append(np.array([s.number for s in rows], dtype=np.int64))
            out.keys.append(result.keys[keep])
            out.chars.append(result.chars[keep])
            if result.signatures is not None:
                sigs.write(np.ascontiguousarray(result.signatures[keep]).tobytes())
            out.rows_ok += len(rows)
            bar.update(len(result.rows))
    return out


def _take_row(cfg: ProcessConfig, out: Collected, status: RowStatus, rejected: IO[str] | None) -> None:
    f = out.inputs.files[status.file]
    loc = f.loc(status.number)
    if status.status != MALFORMED and status.format:
        if f.format is None:
            f.format, f.first_loc = status.format, loc
            kind = KIND_OF[status.format]
            if out.kind is None:
                out.kind, out.first_of_kind = kind, f"{loc} ('{status.format}')"
            elif kind != out.kind:
                raise UserError(f"{loc}: this file holds '{status.format}' rows ({kind} data) but "
                                f"{out.first_of_kind} is {out.kind} data; one run writes one kind of data: "
                                "process them separately, into different --subdir folders")
        elif status.format != f.format:
            status.status = MALFORMED
            status.reason = (f"row is '{status.format}' but {f.first_loc} is '{f.format}': mixed formats in one "
                             "file (split the file, or give --format to read every row one way)")
    if status.status == OK:
        return
    rule = "malformed" if status.status == MALFORMED else status.rule
    out.removed[rule] += 1
    if status.status == MALFORMED and len(out.malformed) < MAX_SHOWN:
        out.malformed.append(f"{loc}: {status.reason}")
    shown = out.examples.setdefault(rule, [])
    if len(shown) < cfg.max_examples:
        shown.append({"source": loc, "reason": status.reason, "row": status.payload[:300]})
    if rejected is not None:
        step = "read" if rule == "malformed" else "clean"
        rejected.write(json.dumps({"source": loc, "step": step, "rule": rule, "reason": status.reason,
                                   "row": status.payload}, ensure_ascii=False) + "\n")


def _check_collected(cfg: ProcessConfig, out: Collected) -> None:
    empty = [f for f in out.inputs.files if f.rows == 0]
    if empty:
        raise UserError("empty input: " + "; ".join(
            f"{f.path} has no rows" + (f" (only {f.blank_lines} blank lines)" if f.blank_lines else "")
            for f in empty))
    bad = out.removed["malformed"]
    if bad and cfg.on_error == "fail":
        raise DataError(out.malformed, total=bad, hint="Nothing was written. Fix these rows, or pass "
                        "--on_error skip to leave them out (they are then counted in report.json and, with "
                        "--keep_rejected, written to rejected.jsonl).")


def _stack(parts: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
    return np.concatenate(parts) if parts else empty


def deduplicate(cfg: ProcessConfig, out: Collected, work: Path) -> tuple[np.ndarray, np.ndarray, NearDuplicates | None,
                                                                          np.ndarray]:
    """(exact representative, near representative, near result, rows after exact) for every stage row."""
    n = out.rows_ok
    keys = _stack(out.keys, np.empty((0, 2), np.uint64))
    exact = exact_representatives(keys) if cfg.dedup else np.arange(n)
    after_exact = np.flatnonzero(exact == np.arange(n))
    near_rep = np.arange(n)
    near = None
    if cfg.near_dedup and n:
        bands, rows = (cfg.bands, cfg.rows) if cfg.bands and cfg.rows else optimal_bands(cfg.threshold, cfg.num_perm)
        sig = np.memmap(work / "signatures.u32", dtype=np.uint32, mode="r", shape=(n, cfg.num_perm))
        near = near_duplicates(sig, after_exact, bands, rows, cfg.threshold)
        near_rep[after_exact] = after_exact[near.rep]
    return exact, near_rep, near, after_exact


def write_split(cfg: ProcessConfig, out: Collected, work: Path, rejected: IO[str] | None,
                tokenizer: Any) -> dict[str, Any]:
    """Pass 2: kept rows to train / validation in input order; removed duplicates counted (and kept aside)."""
    from tqdm.auto import tqdm

    exact, near_rep, near, after_exact = deduplicate(cfg, out, work)
    n = out.rows_ok
    index = np.arange(n)
    kept = np.flatnonzero((exact == index) & (near_rep == index))
    n_val = _validation_size(len(kept), cfg.val_ratio)
    is_val = np.zeros(len(kept), dtype=bool)
    is_val[np.random.default_rng(cfg.seed).permutation(len(kept))[:n_val]] = True
    files = _stack(out.files, np.empty(0, np.int32))
    numbers = _stack(out.numbers, np.empty(0, np.int64))
    locs = {"files": files, "numbers": numbers}
    tokens: list[int] = []
    pending: list[str] = []
    dup_examples: dict[str, list[dict[str, Any]]] = {}
    k = 0
    with open(work / "stage.jsonl", encoding="utf-8") as stage, open(work / "train.jsonl", "w", encoding="utf-8") as \
            train, open(work / "validation.jsonl", "w", encoding="utf-8") if n_val else _null() as val:
        for i, line in enumerate(tqdm(stage, total=n, desc="dedup + split", unit=" rows", disable=None)):
            if exact[i] == i and near_rep[i] == i:
                (val if is_val[k] else train).write(line)  # type: ignore[union-attr]
                k += 1
                if tokenizer is not None:
                    pending.append(content(json.loads(line)))
                    if len(pending) >= 1000:
                        tokens += reporting.count_tokens(tokenizer, pending)
                        pending = []
                continue
            rule, rep = ("exact_duplicate", exact[i]) if exact[i] != i else ("near_duplicate", near_rep[i])
            reason = f"duplicate of {out.loc(files[rep], numbers[rep])}"
            if rule == "near_duplicate" and near is not None:
                reason += f" (estimated Jaccard {near.similarity[np.searchsorted(after_exact, i)]:.2f})"
            shown = dup_examples.setdefault(rule, [])
            if len(shown) < cfg.max_examples:
                shown.append({"source": out.loc(files[i], numbers[i]), "reason": reason,
                              "row": content(json.loads(line))[:300]})
            if rejected is not None:
                rejected.write(json.dumps({"source": out.loc(files[i], numbers[i]), "step": rule.replace(
                    "_duplicate", "_dedup"), "rule": rule, "reason": reason, "row": json.loads(line)},
                    ensure_ascii=False) + "\n")
    if pending:
        tokens += reporting.count_tokens(tokenizer, pending)
    if not n_val:
        (work / "validation.jsonl").unlink(missing_ok=True)
    chars = _stack(out.chars, np.empty(0, np.int64))
    return {"exact": exact, "near": near, "near_rep": near_rep, "after_exact": after_exact, "kept": len(kept),
            "validation": n_val, "locs": locs, "dup_examples": dup_examples, "stage": work / "stage.jsonl",
            "offsets": out.offsets, "lengths": {"chars": chars[kept], "tokens": np.array(tokens, np.int64)
                                                if tokenizer is not None else None}}


def _validation_size(kept: int, ratio: float) -> int:
    """round(kept * ratio), but at least one row when asked for any and never all of them."""
    if ratio <= 0 or kept < 2:
        return 0
    return min(kept - 1, max(1, round(kept * ratio)))


def _publish(work: Path, cfg: ProcessConfig) -> None:
    """Replace a previous result only now that the new one is complete (a failed run leaves the old one)."""
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        (cfg.out_dir / name).unlink(missing_ok=True)
    for name in OUTPUTS:
        if (work / name).exists():
            os.replace(work / name, cfg.out_dir / name)
