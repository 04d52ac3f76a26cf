"""The processing run: read and clean in parallel (pass 1), decide duplicates, write the split (pass 2).

Pass 1 streams batches of raw rows to worker processes and appends what comes back, in input order, to a
stage file of cleaned canonical rows plus a few fixed-width numbers per row (a 128-bit content hash, the
length, the MinHash signature on disk). Duplicates are then decided from those numbers alone, and pass 2
streams the stage file once more into train / validation. Memory grows with the number of rows (about
100 bytes each, plus 8 per LSH band during near dedup), never with their text.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from array import array
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from data_process.dataproc import report as reporting
from data_process.dataproc.dedup import NearDuplicates, exact_representatives, near_duplicates
from data_process.dataproc.minhash import candidate_bands
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
    offsets: array = field(default_factory=lambda: array("q", [0]))  # byte offset of each stage row
    files: list[np.ndarray] = field(default_factory=list)
    numbers: list[np.ndarray] = field(default_factory=list)
    keys: list[np.ndarray] = field(default_factory=list)
    chars: list[np.ndarray] = field(default_factory=list)
    removed: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    malformed: list[str] = field(default_factory=list)
    chars_changed: Counter = field(default_factory=Counter)  # characters each cleaning rule changed, all rows
    rows_changed: Counter = field(default_factory=Counter)  # rows each cleaning rule changed
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
    tokenizer = reporting.load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None  # a bad path fails first
    inputs = expand_inputs(cfg.inputs)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".process_data-", dir=cfg.output_dir))
    try:
        started = time.perf_counter()
        with open(work / "rejected.jsonl", "w", encoding="utf-8") if cfg.keep_rejected else nullcontext() as rejected:
            collected = collect(cfg, inputs, work, rejected)
            read_s = time.perf_counter() - started
            _check_collected(cfg, collected)
            outcome = write_split(cfg, collected, work, rejected, tokenizer)
        outcome.timing = {"read_clean_s": round(read_s, 2), "workers": cfg.workers,
                          "dedup_split_s": round(time.perf_counter() - started - read_s, 2)}
        report = reporting.build(cfg, collected, outcome)
        reporting.write(work, report, {"chars": outcome.chars, "tokens": outcome.tokens})
        if not outcome.kept:
            raise UserError("no rows left after cleaning and deduplication; nothing was written:\n"
                            + reporting.markdown(report))
        _publish(work, cfg)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def _workers(cfg: ProcessConfig) -> Iterator[Any]:
    """A process pool (forked before any progress-bar thread exists), or None to work in this process."""
    if cfg.workers == 1:
        init_worker(cfg)
        yield None
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ctx.Pool(cfg.workers, initializer=init_worker, initargs=(cfg,)) as pool:
        yield pool


def _results(pool: Any, batches: Iterable[list[Item]], window: int) -> Iterator[BatchResult]:
    """Batch results in input order, with at most `window` batches in flight: a huge file never piles up."""
    if pool is None:
        yield from map(process_batch, batches)
        return
    pending: deque[Any] = deque()
    for batch in batches:
        pending.append(pool.apply_async(process_batch, (batch,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def collect(cfg: ProcessConfig, inputs: Inputs, work: Path, rejected: IO[str] | None) -> Collected:
    """Pass 1: every row parsed, converted, cleaned and filtered; kept rows to work/stage.jsonl."""
    from tqdm.auto import tqdm

    out = Collected(inputs)
    with _workers(cfg) as pool, open(work / "stage.jsonl", "wb") as stage, \
            open(work / "signatures.u32", "wb") as sigs, tqdm(desc="read + clean", unit=" rows", disable=None) as bar:
        for result in _results(pool, iter_batches(inputs, cfg.batch_size), 2 * cfg.workers):
            keep = np.ones(len(result.keys), dtype=bool)  # per row that came back ok
            ok_index = 0
            for status in result.rows:
                came_ok = status.status == OK
                _take_row(cfg, out, status, rejected)
                if came_ok:
                    if status.status == OK:
                        line = status.payload.encode("utf-8") + b"\n"
                        stage.write(line)
                        out.offsets.append(out.offsets[-1] + len(line))
                    else:
                        keep[ok_index] = False  # turned malformed: its file mixes formats
                    ok_index += 1
            rows = [s for s in result.rows if s.status == OK]
            out.files.append(np.array([s.file for s in rows], dtype=np.int32))
            out.numbers.append(np.array([s.number for s in rows], dtype=np.int64))
            out.keys.append(result.keys[keep])
            out.chars.append(result.chars[keep])
            if result.signatures is not None:
                sigs.write(np.ascontiguousarray(result.signatures[keep]).tobytes())
            out.rows_ok += len(rows)
            out.chars_changed.update(result.chars_changed)
            out.rows_changed.update(result.rows_changed)
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


@dataclass
class Outcome:
    """The duplicate decisions and the split, per stage row (row i = line i of work/stage.jsonl)."""

    exact: np.ndarray  # index of the first row with the same content (itself when kept)
    near_rep: np.ndarray  # index of the row kept for its near-duplicate cluster (itself when kept)
    near: NearDuplicates | None  # positions in `after_exact`
    after_exact: np.ndarray
    files: np.ndarray
    numbers: np.ndarray
    stage: Path
    offsets: array
    kept: int = 0
    validation: int = 0
    chars: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    tokens: np.ndarray | None = None
    dup_examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)

    def source(self, out: Collected, i: int) -> str:
        return out.loc(int(self.files[i]), int(self.numbers[i]))

    def removal(self, out: Collected, i: int) -> tuple[str, str] | None:
        """(rule, reason) when stage row i is a duplicate, else None."""
        if self.exact[i] != i:
            return "exact_duplicate", f"duplicate of {self.source(out, self.exact[i])}"
        if self.near_rep[i] != i and self.near is not None:
            similarity = self.near.similarity[np.searchsorted(self.after_exact, i)]
            kept = self.source(out, self.near_rep[i])
            return "near_duplicate", f"near duplicate of {kept} (estimated Jaccard {similarity:.2f})"
        return None


def deduplicate(cfg: ProcessConfig, out: Collected, work: Path) -> Outcome:
    n = out.rows_ok
    keys = _stack(out.keys, np.empty((0, 2), np.uint64))
    exact = exact_representatives(keys) if cfg.dedup else np.arange(n)
    after_exact = np.flatnonzero(exact == np.arange(n))
    near_rep = np.arange(n)
    near = None
    if cfg.near_dedup and n:
        bands, rows = (cfg.bands, cfg.rows) if cfg.bands and cfg.rows else candidate_bands(cfg.threshold, cfg.num_perm)
        sig = np.memmap(work / "signatures.u32", dtype=np.uint32, mode="r", shape=(n, cfg.num_perm))
        near = near_duplicates(sig, after_exact, bands, rows, cfg.threshold)
        near_rep[after_exact] = after_exact[near.rep]
    return Outcome(exact, near_rep, near, after_exact, _stack(out.files, np.empty(0, np.int32)),
                   _stack(out.numbers, np.empty(0, np.int64)), work / "stage.jsonl", out.offsets)


def write_split(cfg: ProcessConfig, out: Collected, work: Path, rejected: IO[str] | None,
                tokenizer: Any) -> Outcome:
    """Pass 2: kept rows to train / validation in input order; duplicates counted, shown and kept aside."""
    from tqdm.auto import tqdm

    result = deduplicate(cfg, out, work)
    index = np.arange(out.rows_ok)
    kept = np.flatnonzero((result.exact == index) & (result.near_rep == index))
    result.kept, result.validation = len(kept), _validation_size(len(kept), cfg.val_ratio)
    is_val = np.zeros(len(kept), dtype=bool)
    is_val[np.random.default_rng(cfg.seed).permutation(len(kept))[: result.validation]] = True
    result.chars = _stack(out.chars, np.empty(0, np.int64))[kept]
    tokens: list[int] = []
    batch: list[str] = []
    k = 0
    with open(result.stage, encoding="utf-8") as stage, open(work / "train.jsonl", "w", encoding="utf-8") as train, \
            open(work / "validation.jsonl", "w", encoding="utf-8") if result.validation else nullcontext() as val:
        for i, line in enumerate(tqdm(stage, total=out.rows_ok, desc="dedup + split", unit=" rows", disable=None)):
            removal = result.removal(out, i)
            if removal is None:
                (val if is_val[k] else train).write(line)  # type: ignore[union-attr]
                k += 1
                if tokenizer is not None:
                    batch.append(content(json.loads(line)))
                    if len(batch) >= 1000:
                        tokens += reporting.count_tokens(tokenizer, batch)
                        batch = []
                continue
            rule, reason = removal
            record = json.loads(line)
            shown = result.dup_examples.setdefault(rule, [])
            if len(shown) < cfg.max_examples:
                shown.append({"source": result.source(out, i), "reason": reason, "row": content(record)[:300]})
            if rejected is not None:
                step = rule.replace("_duplicate", "_dedup")
                rejected.write(json.dumps({"source": result.source(out, i), "step": step, "rule": rule,
                                           "reason": reason, "row": record}, ensure_ascii=False) + "\n")
    if tokenizer is not None:
        result.tokens = np.array(tokens + (reporting.count_tokens(tokenizer, batch) if batch else []), np.int64)
    return result


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
