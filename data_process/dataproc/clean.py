"""Text cleaning and the sample filters: Unicode form, odd spaces, control characters, whitespace, length, language.

Each cleaning rule counts the characters it changes (`CLEAN_RULES`), so the report can say what cleaning did.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Any

from data_process.dataproc.normalize import content, empty_field
from data_process.dataproc.options import ProcessConfig

# unicode_form "safe": full-width ASCII letters and digits (U+FF10-FF19, U+FF21-FF3A, U+FF41-FF5A) become ASCII.
# Full-width punctuation (，？；：（）) is Chinese typography and stays, unlike under NFKC.
_FULLWIDTH = re.compile("[\uff10-\uff19\uff21-\uff3a\uff41-\uff5a]")
_FOLD_FULLWIDTH = {cp: cp - 0xFEE0 for cp in [*range(0xFF10, 0xFF1A), *range(0xFF21, 0xFF3B), *range(0xFF41, 0xFF5B)]}
# ... and odd spaces become a plain space: no-break, en/em and the other typographic spaces, narrow no-break,
# medium mathematical. The ideographic space U+3000 stays: it is a character of Chinese text (paragraph indent).
_ODD_SPACE = re.compile("[\u00a0\u2000-\u200a\u202f\u205f]")
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
# What each cleaning rule changed, in characters: unicode (unicode_form), spaces (odd spaces; unicode_form safe),
# control (strip_control), whitespace (normalize_whitespace).
CLEAN_RULES = ("unicode", "spaces", "control", "whitespace")


@functools.cache
def _changed_by(form: str) -> re.Pattern[str]:
    """The characters `form` (NFKC, NFC) changes on their own: NFKC about 4,900, NFC about 1,100. Found once per
    process (0.2 s), then counting them in a text is one regex scan."""
    ranges: list[list[int]] = []
    for cp in range(0x110000):
        if not 0xD800 <= cp < 0xE000 and not unicodedata.is_normalized(form, chr(cp)):
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
    return re.compile("[" + "".join(re.escape(chr(a)) + (f"-{re.escape(chr(b))}" if b > a else "")
                                    for a, b in ranges) + "]")


def _unicode(text: str, form: str) -> tuple[str, int]:
    """(text in `form`, characters changed)."""
    if form == "safe":
        changed = len(_FULLWIDTH.findall(text))
        return (text.translate(_FOLD_FULLWIDTH) if changed else text), changed
    if unicodedata.is_normalized(form, text):
        return text, 0
    out = unicodedata.normalize(form, text)
    # Characters replaced one by one, or (a decomposed accent composed into one character) the length lost.
    return out, max(len(_changed_by(form).findall(text)), len(text) - len(out))


def clean_text(text: str, cfg: ProcessConfig, counts: dict[str, int] | None = None) -> str:
    """The cleaned text; `counts[rule]` grows by the characters each rule of CLEAN_RULES changed."""
    changed = dict.fromkeys(CLEAN_RULES, 0)
    if cfg.unicode_form != "none":
        text, changed["unicode"] = _unicode(text, cfg.unicode_form)
    if cfg.unicode_form == "safe":
        text, changed["spaces"] = _ODD_SPACE.subn(" ", text)
    if cfg.strip_control:
        before = len(text)
        text = text.translate(_DELETE)
        changed["control"] = before - len(text)
    if cfg.normalize_whitespace:
        # Runs of spaces inside a line are kept on purpose: they are code indentation and table layout.
        before, lone_cr = len(text), text.count("\r") - text.count("\r\n")
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if "\n" in text:  # the regexes stop at every space: skip them for single-line text (most of it)
            text = _BLANK_LINES.sub("\n\n", _TRAILING_SPACE.sub("", text))
        text = text.strip()
        changed["whitespace"] = before - len(text) + lone_cr  # characters removed, plus lone CRs made LF
    if counts is not None:
        for rule, n in changed.items():
            if n:
                counts[rule] = counts.get(rule, 0) + n
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
