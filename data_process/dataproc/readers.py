"""Stream rows out of .jsonl / .json / .parquet / .csv / .txt files, each with the place it came from.

JSON Lines are handed on as raw bytes: decoding and parsing happen in the worker processes, so the
reader stays cheap and one core can feed all the others. Nothing is held in memory beyond one batch,
except a .json array (the format has no lines to stream by; use .jsonl for large files).
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_process.dataproc.options import INPUT_SUFFIXES
from self_model.core.errors import DataError, UserError
from self_model.core.rows import json_array_rows, not_utf8

# An item is (file index, line or row number, kind, payload). kind: "json" (raw line bytes), "row" (a dict
# already parsed by pyarrow/csv/json), "text" (one line of a .txt file), "error" (a message for this row).
Item = tuple[int, int, str, Any]
logger = logging.getLogger("self_model")
_SURROGATE = re.compile("[\udc80-\udcff]")


@dataclass
class InputFile:
    path: Path
    index: int
    rows: int = 0  # non-blank lines or rows seen
    blank_lines: int = 0
    format: str | None = None  # set by the pipeline from the first valid row
    first_loc: str = ""
    json_locs: list[str] = field(default_factory=list)  # a .json array: each row's file:line, as the trainers cite it

    def loc(self, number: int) -> str:
        # Line numbers for line-based files and .json arrays (the line a row starts on), 1-based row for parquet.
        if self.path.suffix == ".json":
            return self.json_locs[number]
        if self.path.suffix == ".parquet":
            return f"{self.path}:row {number}"
        return f"{self.path}:{number}"


@dataclass
class Inputs:
    files: list[InputFile] = field(default_factory=list)

    def loc(self, file_index: int, number: int) -> str:
        return self.files[file_index].loc(number)


def expand_inputs(paths: list[str]) -> Inputs:
    """Files as given; folders searched recursively for supported files, in sorted order."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in INPUT_SUFFIXES)
            if not found:
                raise UserError(f"input folder {path} holds no {'/'.join(INPUT_SUFFIXES)} files")
            files += found
        else:
            files.append(path)
    unique: dict[Path, Path] = {}
    for path in files:
        if path.resolve() in unique:
            logger.warning("input %s is given twice (also as %s): it is read once", path, unique[path.resolve()])
        unique.setdefault(path.resolve(), path)
    return Inputs([InputFile(p, i) for i, p in enumerate(unique.values())])


def iter_items(inputs: Inputs) -> Iterator[Item]:
    for f in inputs.files:
        suffix = f.path.suffix
        if suffix == ".jsonl":
            yield from _jsonl(f)
        elif suffix == ".json":
            yield from _json_array(f)
        elif suffix == ".txt":
            yield from _txt(f)
        elif suffix == ".csv":
            yield from _csv(f)
        elif suffix == ".parquet":
            yield from _parquet(f)
        else:  # options.validate refuses these; a folder only yields supported suffixes
            raise UserError(f"{f.path}: unsupported file type '{suffix}'")


def iter_batches(inputs: Inputs, batch_size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in iter_items(inputs):
        batch.append(item)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _jsonl(f: InputFile) -> Iterator[Item]:
    with f.path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                f.blank_lines += 1
                continue
            f.rows += 1
            yield f.index, lineno, "json", raw


def _txt(f: InputFile) -> Iterator[Item]:
    with f.path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                f.blank_lines += 1
                continue
            f.rows += 1
            try:
                yield f.index, lineno, "text", raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                yield f.index, lineno, "error", not_utf8(raw, exc)


def _json_array(f: InputFile) -> Iterator[Item]:
    rows = json_array_rows(f.path)  # the trainers' reader: the same locations, the same errors
    f.json_locs = [loc for loc, _ in rows]
    for i, (_, row) in enumerate(rows):
        f.rows += 1
        yield f.index, i, "row", row


def _csv(f: InputFile) -> Iterator[Item]:
    # surrogateescape keeps undecodable bytes as lone surrogates, so a bad row is found and named by line
    # instead of the whole file failing at an unknown place.
    csv.field_size_limit(2**31 - 1)  # the default (128 KiB per field) is shorter than many documents
    with f.path.open(encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh)
        try:
            header = reader.fieldnames or []
        except csv.Error as exc:
            raise DataError([f"{f.path}:1: not a readable CSV header: {exc}"]) from None
        if any(_has_surrogates(h) for h in header):
            raise DataError([f"{f.path}:1: the header is not UTF-8"], hint="re-encode the file as UTF-8")
        start = 2
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # e.g. a NUL byte: the reader cannot go on past it
                raise DataError([f"{f.path}:{start}: not readable as CSV: {exc}"]) from None
            f.rows += 1
            if None in row or any(v is None for v in row.values()):
                yield f.index, start, "error", f"expected {len(header)} columns {header}"
            elif any(_has_surrogates(v) for v in row.values()):
                yield f.index, start, "error", "not UTF-8; re-encode the file as UTF-8"
            else:
                yield f.index, start, "row", row
            start = reader.line_num + 1


def _parquet(f: InputFile) -> Iterator[Item]:
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(f.path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file; all mean the same
        raise DataError([f"{f.path}: not a readable parquet file: {exc}"]) from None
    number = 0
    for batch in pfile.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            f.rows += 1
            yield f.index, number, "row", row


def _has_surrogates(value: Any) -> bool:
    return isinstance(value, str) and _SURROGATE.search(value) is not None
