"""Plain-text corpora for continued pretraining: which files, and the documents in them.

`data.train_file` / `data.eval_file` name files, folders (every `.txt` / `.jsonl` inside, recursively) or
globs. A `.txt` file holds one document per line (blank lines are separators, not documents); a `.jsonl`
file one JSON object per line, whose text is the `text_fields` present in the row, joined in order; a row
with none of them that holds a `messages` / `conversations` record is flattened to the text of its turns.
Bad input is never skipped: undecodable bytes (file and byte offset), malformed JSON, rows without text
and empty files are collected and reported together, with their `file:line`.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from self_model.core.conversations import detect_format, get_format
from self_model.core.errors import DataError
from self_model.core.rows import MAX_SHOWN, RowError

SUFFIXES = (".txt", ".jsonl")
CHAT_KEYS = ("messages", "conversations")
_BOM = b"\xef\xbb\xbf"


def _is_glob(entry: str) -> bool:
    return any(c in entry for c in "*?[")


def resolve_entry(entry: str) -> list[Path]:
    """One `train_file` entry -> the files it names (sorted); empty when nothing matches."""
    if _is_glob(entry):
        return sorted(Path(p) for p in glob.glob(entry, recursive=True) if Path(p).is_file())
    path = Path(entry)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    return [path] if path.is_file() else []


def corpus_problems(value: str | list[str], key: str) -> list[str]:
    """Config check for `data.train_file` / `data.eval_file`: every entry names at least one usable file."""
    problems = []
    for entry in [value] if isinstance(value, str) else value:
        files = resolve_entry(entry)
        if not files:
            what = "no file matches the glob" if _is_glob(entry) else (
                "the folder holds no .txt or .jsonl file" if Path(entry).is_dir() else "file not found")
            problems.append(f"{key}: {what}: {entry}")
        for f in files:
            if f.suffix not in SUFFIXES:
                problems.append(f"{key}: {f}: unsupported file type '{f.suffix}'; expected .txt (one document a "
                                "line) or .jsonl (one JSON object a line)")
    return problems


def resolve_corpus(value: str | list[str]) -> list[Path]:
    """Every file named by the entries, in order, each once."""
    seen: dict[Path, None] = {}
    for entry in [value] if isinstance(value, str) else value:
        for f in resolve_entry(entry):
            seen.setdefault(f.resolve(), None)
    return list(seen)


def file_signature(files: list[Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of each file: what the tokenization cache is keyed on."""
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


@dataclass
class CorpusStats:
    """What reading found; problems are `file:line: what` strings (the first MAX_SHOWN of `bad`)."""

    files: int = 0
    documents: int = 0
    characters: int = 0
    empty_rows: int = 0
    empty_examples: list[str] = field(default_factory=list)
    bad: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, message: str) -> None:
        self.bad += 1
        if len(self.problems) < MAX_SHOWN:
            self.problems.append(message)

    def raise_if_bad(self, what: str) -> None:
        if self.problems:
            raise DataError(self.problems, total=self.bad,
                            hint=f"Fix the {what} (nothing was trained); data_process/process_data.py can clean "
                                 "a file and report what it removed.")

    def summary(self) -> dict[str, Any]:
        return {"files": self.files, "documents": self.documents, "characters": self.characters,
                "skipped_empty_rows": self.empty_rows, "first_empty_rows": self.empty_examples}


def row_text(row: Any, text_fields: list[str]) -> str:
    """The text of one JSONL row: its `text_fields` joined in order, else a flattened chat record."""
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    parts = []
    for name in text_fields:
        if name in row and row[name] is not None:
            if not isinstance(row[name], str):
                raise RowError(f"field '{name}' must be a string, got {type(row[name]).__name__}")
            parts.append(row[name])
    if parts:
        return "\n".join(p for p in parts if p.strip())
    if any(k in row for k in CHAT_KEYS):
        messages = get_format(detect_format(row)).convert(row)
        return "\n".join(m["content"] for m in messages if isinstance(m.get("content"), str) and m["content"].strip())
    raise RowError(f"none of the text_fields {text_fields} is present (keys: {sorted(row)[:10]}) and it holds no "
                   f"{' / '.join(CHAT_KEYS)} record; set data.text_fields to the field(s) holding the text")


def _lines(path: Path, stats: CorpusStats) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) with undecodable bytes reported by file, line and byte offset."""
    offset = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            start = offset
            offset += len(raw)
            if lineno == 1 and raw.startswith(_BOM):
                raw, start = raw[len(_BOM):], start + len(_BOM)
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = raw[exc.start:exc.start + 4].hex(" ")
                stats.problem(f"{path}:{lineno}: byte offset {start + exc.start}: not valid UTF-8 (bytes {bad}); "
                              "convert the file to UTF-8 (e.g. iconv -f GB18030 -t UTF-8)")


def iter_documents(files: list[Path], text_fields: list[str], stats: CorpusStats) -> Iterator[str]:
    """Yield every document; problems go into `stats` (the caller raises after reading everything)."""
    for path in files:
        stats.files += 1
        before, bad_before = stats.documents, stats.bad
        for lineno, line in _lines(path, stats):
            if not line.strip():
                continue
            if path.suffix == ".txt":
                text = line.rstrip("\r\n")
            else:
                try:
                    text = row_text(json.loads(line), text_fields)
                except json.JSONDecodeError as exc:
                    stats.problem(f"{path}:{lineno}: malformed JSON: {exc.msg} at column {exc.colno}")
                    continue
                except (RowError, KeyError) as exc:
                    stats.problem(f"{path}:{lineno}: {exc}")
                    continue
                if not text.strip():
                    stats.empty_rows += 1  # reported in the data report, with the first few locations
                    if len(stats.empty_examples) < MAX_SHOWN:
                        stats.empty_examples.append(f"{path}:{lineno}")
                    continue
            stats.documents += 1
            stats.characters += len(text)
            yield text
        if stats.documents == before and stats.bad == bad_before:
            stats.problem(f"{path}: the file is empty (no text); remove it from the data or fill it")


def read_strict(files: list[Path], text_fields: list[str]) -> Iterator[dict[str, str]]:
    """Streaming reader: rows as `{"text": ...}`; the first bad row raises (a stream cannot be checked ahead)."""
    stats = CorpusStats()
    for text in iter_documents(files, text_fields, stats):
        stats.raise_if_bad("data")
        yield {"text": text}
    stats.raise_if_bad("data")


def corpus_paths(value: str | list[str], path: str) -> list[str]:
    """Field check: each entry is a file, a folder or a glob naming at least one .txt / .jsonl file."""
    return corpus_problems(value, path)
