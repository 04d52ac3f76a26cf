"""Text cleaning and the sample filters: Unicode form, control characters, whitespace, length, language."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from data_process.dataproc.normalize import content, empty_field
from data_process.dataproc.options import ProcessConfig

# Control characters (newline and tab are text) and invisible characters that only break matching:
# zero-width space, word joiner, byte-order mark. ZWJ/ZWNJ stay: emoji sequences and Persian need them.
_DELETE = {cp: None for cp in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0),
                               0x200B, 0x2060, 0xFEFF]}
_TRAILING_SPACE = re.compile(r"[ \t\u00a0\u3000]+(?=\n)")
_BLANK_LINES = re.compile(r"\n{3,}")
_HAN_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df"
_HAN = re.compile(f"[{_HAN_RANGES}]")
_OTHER_WORD = re.compile(f"[^\\W\\d_{_HAN_RANGES}]+")  # a run of letters of any script but Han
_LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f]+")

RULES = ("empty", "identical_replies", "too_short", "too_long", "language")


def clean_text(text: str, cfg: ProcessConfig) -> str:
    if cfg.unicode_form != "none":
        text = unicodedata.normalize(cfg.unicode_form, text)
    if cfg.strip_control:
        text = text.translate(_DELETE)
    if cfg.normalize_whitespace:
        # Runs of spaces inside a line are kept on purpose: they are code indentation and table layout.
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if "\n" in text:  # the regexes stop at every space: skip them for single-line text (most of it)
            text = _BLANK_LINES.sub("\n\n", _TRAILING_SPACE.sub("", text))
        text = text.strip()
    return text


def script_ratio(text: str, lang: str) -> float:
    """Share of the words of `text` written in the script of `lang` (Han for zh, Latin for en).

    A Han character counts as one word, like a run of letters in any other script: counting characters
    would let one English term outweigh a Chinese sentence ("高血压 (hypertension)" is Chinese).
    """
    han = _HAN.subn("", text)[1]
    words = han + _OTHER_WORD.subn("", text)[1]
    if not words:
        return 0.0
    return (han if lang == "zh" else _LATIN_WORD.subn("", text)[1]) / words


def check_sample(record: dict[str, Any], cfg: ProcessConfig) -> tuple[str, str] | None:
    """(rule, reason) when a cleaned record must be removed, else None."""
    empty = empty_field(record)
    if empty:
        return "empty", f"{empty} is empty after cleaning"
    if "chosen" in record and record["chosen"] == record["rejected"]:
        # A pair with the same reply on both sides teaches DPO nothing, and train_dpo.py refuses it.
        return "identical_replies", "'chosen' and 'rejected' are the same after cleaning"
    text = content(record)
    if len(text) < cfg.min_chars:
        return "too_short", f"{len(text)} characters < min_chars {cfg.min_chars}"
    if len(text) > cfg.max_chars:
        return "too_long", f"{len(text)} characters > max_chars {cfg.max_chars}"
    if cfg.lang:
        ratio = script_ratio(text, cfg.lang)
        if ratio < cfg.lang_min_ratio:
            return "language", f"{ratio:.0%} of the words are {cfg.lang} script < lang_min_ratio {cfg.lang_min_ratio}"
    return None


def dedup_text(text: str) -> str:
    """What exact and near duplicates are judged on: case and spacing differences do not make a new sample."""
    return " ".join(text.casefold().split())
