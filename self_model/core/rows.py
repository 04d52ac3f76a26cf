"""The one row reader: JSON Lines and JSON arrays, each row located as `file:line`, every bad row collected.

Each consumer brings only its row converter: SFT turns a row into a conversation, DPO into a preference pair,
PPO / GRPO into a prompt with its reference answer, `data_process` into a cleaned record. The reader opens the
files, decodes and parses each row, calls the converter, and when rows are bad raises one `DataError` that shows
the first `MAX_SHOWN` of them with their location and counts the rest: nothing is skipped silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from self_model.core.errors import DataError, UserError

T = TypeVar("T")
MAX_SHOWN = 10


class RowError(ValueError):
    """A problem with one row; the reader prefixes it with file:line."""


def not_utf8(raw: bytes, exc: UnicodeDecodeError) -> str:
    return f"not UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 4]!r}); re-encode the file as UTF-8"


def parse_json_line(raw: bytes) -> dict[str, Any] | RowError:
    """One line of a .jsonl file as a row, or the RowError saying why it is not one."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RowError(not_utf8(raw, exc))
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return RowError(f"malformed JSON: {exc.msg.removesuffix(' at')} at column {exc.colno}")
    return row if isinstance(row, dict) else RowError(f"expected a JSON object per line, got {type(row).__name__}")


def json_array_rows(path: Path) -> list[tuple[str, Any]]:
    """The elements of a .json array file, each with its location `file:line` (the line its element starts on, so
    .json and .jsonl rows are cited alike; `file:line (row N)` when several rows start on one line)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError([f"{path}: not UTF-8 at byte {exc.start}"], hint="re-encode the file as UTF-8") from None
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    try:
        if not text.startswith("[", pos):
            kind = type(json.loads(text)).__name__
            raise DataError([f"{path}: expected a JSON array of rows, got a {kind}"],
                            hint="a file with one object per line should be named .jsonl")
        found: list[tuple[int, Any]] = []
        pos += 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text) or text[pos] == "]":
                break
            element, end = decoder.raw_decode(text, pos)
            found.append((text.count("\n", 0, pos) + 1, element))
            pos = end
        if pos >= len(text):
            raise json.JSONDecodeError("the array is not closed with ]", text, pos)
    except json.JSONDecodeError as exc:
        raise DataError([f"{path}:{exc.lineno}: not valid JSON: {exc.msg} at column {exc.colno}"]) from None
    lines = [line for line, _ in found]
    return [(f"{path}:{line}" if lines.count(line) == 1 else f"{path}:{line} (row {i})", element)
            for i, (line, element) in enumerate(found, 1)]


# A data set's column names -> its format's keys, by file, while core.dataset_mix reads a registry entry with
# `columns:` (the converters then see the keys they know; rows keep their file:line).
RENAMED_COLUMNS: dict[Path, dict[str, str]] = {}


def iter_rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
    """Yield (location, row or RowError) for a .jsonl file (one object a line, blank lines skipped) or a .json
    array; both located as `file:line`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    columns = RENAMED_COLUMNS.get(path.resolve())
    for loc, row in _file_rows(path):
        if columns and isinstance(row, dict):
            row = {**{k: v for k, v in row.items() if k not in columns.values()},
                   **{key: row[col] for key, col in columns.items() if col in row}}
        yield loc, row


def _file_rows(path: Path) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
    if path.suffix == ".json":
        for loc, row in json_array_rows(path):
            yield loc, row if isinstance(row, dict) else RowError("row is not a JSON object")
        return
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if raw.strip():
                yield f"{path}:{lineno}", parse_json_line(raw)


class OneFormatPerFile:
    """Refuses a file whose rows are of different formats (a sign of two data sets concatenated by mistake)."""

    def __init__(self) -> None:
        self.first: dict[Path, tuple[str, str]] = {}

    def check(self, path: Path, name: str, loc: str) -> None:
        first = self.first.setdefault(path, (name, loc))
        if first[0] != name:
            raise RowError(f"row is '{name}' but {first[1]} is '{first[0]}'; one file holds one format")


def read_rows(paths: str | list[str], convert: Callable[[dict[str, Any], str, Path], T | None],
              hint: str = "Fix these rows (nothing was trained).") -> list[T]:
    """Convert every row of every file with `convert(row, location, path)`; collect the RowErrors it raises.

    `convert` returns the converted row, or None for a row it sets aside on purpose (and counts itself). An empty
    file is a problem too. With any problem, one DataError lists the first MAX_SHOWN and the total.
    """
    out: list[T] = []
    problems: list[str] = []
    bad = 0
    for path in map(Path, [paths] if isinstance(paths, str) else paths):
        seen = 0
        for loc, row in iter_rows(path):
            seen += 1
            try:
                if isinstance(row, RowError):
                    raise row
                converted = convert(row, loc, path)
            except (RowError, KeyError) as exc:
                bad += 1
                if len(problems) < MAX_SHOWN:
                    problems.append(f"{loc}: {exc}")
                continue
            if converted is not None:
                out.append(converted)
        if not seen:
            bad += 1
            problems.append(f"{path}: no rows (the file is empty)")
    if problems:
        raise DataError(problems, total=bad, hint=hint)
    return out


def length_stats(lengths: list[int]) -> dict[str, Any]:
    """What every data report says about lengths (tokens, characters): min, mean, p50, p95 and max, the
    percentiles by nearest rank so each is a length that occurs. An empty list reports zeros."""
    values = sorted(lengths) or [0]

    def rank(q: float) -> int:
        return int(values[min(len(values) - 1, int(q * len(values)))])

    return {"min": int(values[0]), "mean": round(sum(values) / len(values), 1), "p50": rank(0.5), "p95": rank(0.95),
            "max": int(values[-1])}
