"""Options of process_data.py: one dataclass that is both the YAML schema (`--config`) and the command line.

Every field becomes a flag of the same name (`--min_chars 10`, `--dedup` / `--no-dedup`); a value given on
the command line wins over the YAML. Both go through the strict loader of the training configs, so a
misspelled key or a wrong type is reported with a did-you-mean, all problems at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from self_model.core.config import did_you_mean, load_config, read_yaml

# Formats process_data.py understands, read by the trainers' converters: sharegpt / messages / alpaca by
# self_model.core.conversations, preference by core.preferences, qa by core.prompt_rows.
FORMATS = ("text", "sharegpt", "messages", "alpaca", "preference", "qa")
INPUT_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")


def _opt(default: Any, help_text: str) -> Any:
    """A field with its --help text: the command-line flags are made from these fields."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


@dataclass
class ProcessConfig:
    """config/data_config/process.yaml; every key is also a command-line flag."""

    input: list[str] | str = _opt([], "input files or folders (.jsonl .json .parquet .csv .txt); folders are searched "
                                "recursively")
    output_dir: str = _opt("data_process/final_data", "root of the outputs")
    subdir: str = _opt("finetune", "outputs go to <output_dir>/<subdir>/ (finetune, pretrain, reward, grpo, ...)")
    format: str = _opt("auto", f"auto (detected per file) or one of {list(FORMATS)}")
    text_field: str = _opt("text", "the column that holds the text of plain-text rows (jsonl/csv/parquet)")
    on_error: Literal["fail", "skip"] = _opt("fail", "malformed rows: fail (report them, write nothing) or skip "
                                                     "(report and leave them out)")
    overwrite: bool = _opt(False, "replace a previous result in the output folder")
    # Cleaning.
    unicode_form: Literal["safe", "NFKC", "NFC", "none"] = _opt(
        "safe", "safe: full-width letters and digits to ASCII and odd spaces to ' ', Chinese punctuation kept; NFKC "
                "(also turns full-width punctuation such as '，' into ','), NFC, or none")
    strip_control: bool = _opt(True, "remove control and zero-width characters (newline and tab stay)")
    normalize_whitespace: bool = _opt(True, "CRLF to LF, no trailing spaces, at most one blank line; indentation "
                                            "stays (code)")
    min_chars: int = _opt(5, "drop samples whose content is shorter (characters, after cleaning)")
    max_chars: int = _opt(100_000, "drop samples whose content is longer")
    lang: Literal["zh", "en"] | None = _opt(None, "keep only samples in this language (zh or en)")
    lang_min_ratio: float = _opt(0.5, "share of the sample's words in that script (a Han character counts as a word)")
    # Deduplication.
    dedup: bool = _opt(False, "remove exact duplicates (same content after cleaning, case and spacing ignored)")
    near_dedup: bool = _opt(False, "remove near duplicates with MinHash + LSH")
    ngram: int = _opt(5, "shingle size for near_dedup, in units of ngram_unit")
    ngram_unit: Literal["auto", "char", "word"] = _opt("auto", "auto: characters for CJK text (30% or more of it), "
                                                               "words otherwise")
    num_perm: int = _opt(128, "MinHash permutations (signature length)")
    threshold: float = _opt(0.8, "Jaccard similarity at which two samples count as near duplicates")
    bands: int | None = _opt(None, "LSH bands (with rows); default: chosen from threshold and num_perm, favouring "
                                   "recall (candidates are verified)")
    rows: int | None = _opt(None, "LSH rows per band (with bands)")
    # Split.
    val_ratio: float = _opt(0.05, "share of the kept samples written to validation.jsonl (0: no validation file)")
    seed: int = _opt(42, "seed of the train/validation split and of the MinHash permutations")
    # Report.
    tokenizer: str | None = _opt(None, "a tokenizer folder or hub id: adds token-length histograms to the report")
    keep_rejected: bool = _opt(False, "write every removed row to rejected.jsonl with the reason")
    max_examples: int = _opt(5, "rejected rows shown per rule and duplicate clusters shown in the report")
    # Performance.
    num_proc: int | None = _opt(None, "worker processes (null: all cores)")
    batch_size: int = _opt(1000, "rows per worker task")

    def validate(self) -> list[str]:
        errors = []
        if not self.inputs:
            errors.append("input: required; give one or more files or folders (--input a.jsonl b.jsonl)")
        for path in self.inputs:
            if not Path(path).exists():
                errors.append(f"input: no such file or folder: {path}")
            elif Path(path).is_file() and Path(path).suffix not in INPUT_SUFFIXES:
                errors.append(f"input: {path}: unsupported file type '{Path(path).suffix}'; "
                              f"expected one of {list(INPUT_SUFFIXES)}")
        if self.format != "auto" and self.format not in FORMATS:
            errors.append(f"format: unknown format '{self.format}'{did_you_mean(self.format, FORMATS)}; "
                          f"known: {list(FORMATS)} or auto")
        checks = [("min_chars", self.min_chars >= 0, "must be >= 0"),
                  ("max_chars", self.max_chars >= max(1, self.min_chars), "must be >= min_chars and >= 1"),
                  ("lang_min_ratio", 0.0 < self.lang_min_ratio <= 1.0, "must be in (0, 1]"),
                  ("ngram", self.ngram >= 1, "must be >= 1"),
                  ("num_perm", 2 <= self.num_perm <= 1024, "must be between 2 and 1024"),
                  ("threshold", 0.0 < self.threshold < 1.0, "must be between 0 and 1 (exclusive)"),
                  ("val_ratio", 0.0 <= self.val_ratio < 1.0, "must be in [0, 1)"),
                  ("max_examples", self.max_examples >= 0, "must be >= 0"),
                  ("num_proc", self.num_proc is None or self.num_proc >= 1, "must be >= 1"),
                  ("batch_size", self.batch_size >= 1, "must be >= 1")]
        errors += [f"{key}: {getattr(self, key)!r} {msg}" for key, ok, msg in checks if not ok]
        if (self.bands is None) != (self.rows is None):
            errors.append("bands / rows: set both or neither (neither: chosen from threshold and num_perm)")
        elif self.bands is not None and self.rows is not None:
            if self.bands < 1 or self.rows < 1 or self.bands * self.rows > self.num_perm:
                errors.append(f"bands * rows = {self.bands} * {self.rows} must be between 1 and num_perm "
                              f"({self.num_perm})")
        if not self.subdir or Path(self.subdir).is_absolute() or ".." in Path(self.subdir).parts:
            errors.append(f"subdir: {self.subdir!r} must be a relative folder name inside output_dir")
        return errors

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir) / self.subdir

    @property
    def workers(self) -> int:
        if self.num_proc:
            return self.num_proc
        # The cores this process may use (a container or taskset can allow fewer than the machine has).
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_parser(description: str) -> argparse.ArgumentParser:
    """One flag per ProcessConfig field; defaults are left to the dataclass so the YAML can set them."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="a YAML with any of the options below (flags win over the YAML)")
    hints = typing.get_type_hints(ProcessConfig)
    for f in dataclasses.fields(ProcessConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        help_text = f"{f.metadata['help']} (default: {default})".replace("%", "%%")  # argparse formats %
        if hints[f.name] is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=help_text)
        elif f.name == "input":
            parser.add_argument("--input", nargs="+", help=help_text)
        else:
            # Values are read as YAML scalars (10 -> int, 0.1 -> float, null -> None) and checked by the loader.
            parser.add_argument(f"--{f.name}", type=_yaml_scalar, help=help_text)
    return parser


def _yaml_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def load_process_config(argv: list[str] | None = None, description: str = "") -> ProcessConfig:
    """Merge --config YAML and flags, then check everything with the strict loader (ConfigError lists all)."""
    args = vars(build_parser(description).parse_args(argv))
    config_path = args.pop("config", None)
    data = read_yaml(config_path) if config_path else {}
    data.update(args)
    return load_config(ProcessConfig, config_path, data=data)
