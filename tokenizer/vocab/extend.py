"""Vocabulary extension, shared part: the YAML schema (config/tokenizer_config/extend.yaml), the base tokenizer's
kind, the corpus and the word list, output folders that are never overwritten by accident, and the report.

Two kinds of base tokenizer are supported (`KINDS`): a byte-level BPE `tokenizer.json` (Qwen2, Llama-3,
DeepSeek, GPT-2; handled in `vocab_bpe.py`) and a SentencePiece model file (Llama-2, Baichuan, ChatGLM;
`vocab_sp.py`). The model side (new embedding rows) is `vocab_resize.py`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from self_model.core.config import existing_files
from self_model.core.corpus import CorpusStats, corpus_paths, iter_documents, resolve_corpus
from self_model.core.errors import UserError
from self_model.core.stage_config import local_or_hub
from self_model.core.vocab_file import EXTENSION_FILE

logger = logging.getLogger("self_model")

KINDS = {
    "byte_level_bpe": "a tokenizer.json holding a BPE model with a ByteLevel pre-tokenizer (Qwen2, Llama-3, DeepSeek, "
                      "GPT-2)",
    "sentencepiece": "a SentencePiece model file, tokenizer.model or *.model (Llama-2, Baichuan, ChatGLM)",
}
# Tokenizer files copied from the base next to the merged vocabulary (the chat template, special tokens, remote
# code). vocab.json / merges.txt and a SentencePiece base's tokenizer.json are left out: they would be stale.
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                        "chat_template.json")
# The merge measures the training corpus on its first documents only (the held-out text is measured in full).
MEASURED_TRAIN_DOCS = 20_000
# Unrelated text that must encode exactly as before the extension (checked by every merge).
PROBE_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 3:45 pm, isn't it?",
    "def mean(xs: list[float]) -> float:\n    return sum(xs) / len(xs)  # TODO: empty list\n\tif a != b: pass",
    "Emoji 😀🎉👍🏽 and symbols ©®™ ½ → ∑ ∞, café naïve Zürich",
    "  indented   spaces\n\n\nthree newlines\r\nand a CRLF",
    "北京是中国的首都，今天天气晴朗。Москва — столица России. 東京は日本の首都です。",
]


def _positive(value: int, path: str) -> list[str]:
    return [] if value > 0 else [f"{path}: must be a positive integer, got {value}"]


@dataclass
class VocabCorpusConfig:
    """`corpus:` the domain text. Same rules as continued pretraining's `data:` (.txt lines, .jsonl text_fields)."""

    # A file, a folder (every .txt / .jsonl inside) or a glob, or a list of them: the tokenizer learns from it.
    train_file: str | list[str] = field(metadata={"check": corpus_paths})
    # Held-out domain text, never trained on: tokens per character before / after are measured on it.
    eval_file: str | list[str] | None = field(default=None, metadata={"check": corpus_paths})
    text_fields: list[str] = field(default_factory=lambda: ["text"])


@dataclass
class DomainTrainConfig:
    """`train:` the domain tokenizer (HF `tokenizers` BPE for byte-level bases, SentencePiece for SentencePiece)."""

    # Size of the domain tokenizer trained on the corpus; its tokens missing from the base are the candidates.
    vocab_size: int = field(default=4000, metadata={"check": _positive})
    # A token is learned only from a pair (BPE) / a piece text (SentencePiece) seen at least this often.
    min_frequency: int = field(default=2, metadata={"check": _positive})
    # One word a line (medical terms, segmented Chinese words); '#' starts a comment. Added after checks.
    word_list: str | None = field(default=None, metadata={"check": existing_files})
    # SentencePiece only: share of characters covered by single-character pieces.
    character_coverage: float = 0.9995
    output_dir: str = "tokenizer/domain_tokenizer"

    def __post_init__(self) -> None:
        if not 0.0 < self.character_coverage <= 1.0:
            raise ValueError(f"train.character_coverage must be in (0, 1], got {self.character_coverage}")


@dataclass
class MergeConfig:
    """`merge:` the base tokenizer plus the domain tokens."""

    output_dir: str = "tokenizer/merged_tokenizer"


@dataclass
class ResizeConfig:
    """`resize:` the base model with embedding / LM-head rows for the new tokens."""

    output_dir: str = "tokenizer/merged_model"
    # When the rows must grow, round them up to a multiple of this (e.g. 64, for GPU kernels); null: exactly.
    pad_to_multiple_of: int | None = field(default=None, metadata={"check": _positive})


@dataclass
class ExtendConfig:
    """config/tokenizer_config/extend.yaml: one file drives the three commands under tokenizer/."""

    # A folder (or hub id) holding the base tokenizer: tokenizer.json (byte-level BPE) or tokenizer.model.
    base_tokenizer: str = field(metadata={"check": local_or_hub})
    corpus: VocabCorpusConfig = field(default=None, metadata={"required": True})  # type: ignore[assignment]
    # The model the base tokenizer belongs to (resize_model.py only).
    base_model: str | None = field(default=None, metadata={"check": local_or_hub})
    train: DomainTrainConfig = field(default_factory=DomainTrainConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    resize: ResizeConfig = field(default_factory=ResizeConfig)
    # Run code shipped with a hub tokenizer / model (Baichuan, ChatGLM). Off unless you trust the repository.
    trust_remote_code: bool = False
    # Replace an existing output folder. Off: a finished output is never overwritten.
    overwrite: bool = False

    def validate(self) -> list[str]:
        outs = [self.train.output_dir, self.merge.output_dir, self.resize.output_dir]
        if len({str(Path(p).resolve()) for p in outs}) < 3:
            return [f"train.output_dir / merge.output_dir / resize.output_dir must differ, got {outs}"]
        return []


# ---- the base tokenizer ---------------------------------------------------------------------------------
@dataclass
class BaseTokenizer:
    kind: str
    folder: Path
    file: Path  # tokenizer.json (byte_level_bpe) or the SentencePiece model file


def local_tokenizer_folder(name: str) -> Path:
    """A local folder (or a tokenizer file in it), or a hub id downloaded (tokenizer files only)."""
    path = Path(name)
    if path.is_file():
        return path.parent
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        patterns = ["tokenizer*", "*.model", "*.tiktoken", "special_tokens_map.json", "added_tokens.json",
                    "chat_template*", "*.py", "config.json"]
        return Path(snapshot_download(repo_id=name, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one actionable message
        raise UserError(f"base_tokenizer: '{name}' is not a local folder and could not be fetched from the hub "
                        f"({type(exc).__name__}: {exc}); download it and give the folder") from None


def detect_kind(name: str) -> BaseTokenizer:
    """Which supported kind the base tokenizer is; anything else is refused with the supported kinds."""
    from tokenizer.vocab.bpe import bpe_problem

    folder = local_tokenizer_folder(name)
    given = Path(name) if Path(name).is_file() else None
    tok_json = given if given and given.suffix == ".json" else folder / "tokenizer.json"
    sp_files = [given] if given and given.suffix == ".model" else sorted(folder.glob("*.model"))
    problem = None
    if tok_json.is_file():
        problem = bpe_problem(json.loads(tok_json.read_text(encoding="utf-8")))
        if problem is None:
            return BaseTokenizer("byte_level_bpe", folder, tok_json)
    if sp_files:
        return BaseTokenizer("sentencepiece", folder, sp_files[0])
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    why = f"its tokenizer.json is {problem}" if problem else f"it holds no tokenizer.json or *.model (files: {found})"
    supported = "\n".join(f"  - {k}: {v}" for k, v in KINDS.items())
    raise UserError(f"base_tokenizer: {name}: unsupported tokenizer: {why}.\nSupported kinds:\n{supported}")


# ---- the corpus and the word list -------------------------------------------------------------------------
def read_texts(spec: str | list[str] | None, text_fields: list[str]) -> list[str]:
    """Every document of `spec` (corpus.py rules); bad rows and undecodable bytes stop with file:line."""
    if not spec:
        return []
    stats = CorpusStats()
    texts = list(iter_documents(resolve_corpus(spec), text_fields, stats))
    stats.raise_if_bad("corpus")
    return texts


def read_word_list(path: str | None) -> list[str]:
    """One word a line; blank lines and '# comments' ignored; duplicates kept once (and logged)."""
    if not path:
        return []
    words: dict[str, None] = {}
    dupes = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1):
        word = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if not word:
            continue
        if word in words:
            dupes.append(f"{path}:{lineno}: {word}")
        words.setdefault(word, None)
    if dupes:
        logger.warning("train.word_list: %d duplicate word(s) kept once, e.g. %s", len(dupes), dupes[:3])
    if not words:
        raise UserError(f"train.word_list: {path} holds no words (one word a line); remove the key or fill the file")
    return list(words)


def space_variant(word: str) -> bool:
    """A Latin / digit-initial word mostly follows a space inside a sentence: its space-prefixed form is added too."""
    return word[:1].isascii() and word[:1].isalnum()


# ---- output folders ---------------------------------------------------------------------------------------
def start_output(out: str | Path, overwrite: bool, key: str) -> Path:
    """The temporary folder to write into; an existing output needs `overwrite=true`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{key}: {out} already exists and is never overwritten by accident; pass overwrite=true to "
                        f"replace it, or choose another folder ({key}={out}-2)")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


@contextmanager
def staged_output(out: str | Path, overwrite: bool, key: str) -> Iterator[Path]:
    """Write into `<out>.tmp`; on success it replaces `out`, on failure it is removed: a crash or a failed check
    never leaves something that looks finished."""
    tmp = start_output(out, overwrite, key)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if Path(out).exists():
        shutil.rmtree(out)
    tmp.rename(out)


def copy_side_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy the base's tokenizer side files (chat template, special tokens, remote code) into `dst`."""
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name not in skip and (
                path.name in TOKENIZER_SIDE_FILES or (path.name.startswith("tokenization") and path.suffix == ".py")):
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_extension(folder: str | Path, key: str) -> dict[str, Any]:
    path = Path(folder) / EXTENSION_FILE
    if not path.is_file():
        raise UserError(f"{key}: {folder} holds no {EXTENSION_FILE}, so it was not written by "
                        "tokenizer/merge_tokenizer.py; run that first (same --config)")
    return json.loads(path.read_text(encoding="utf-8"))


# ---- the domain tokenizer's candidates (train_domain_tokenizer.py -> merge_tokenizer.py) ---------------------
CANDIDATES_FILE = "candidates.json"


def file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_candidates(out: Path, base: BaseTokenizer, candidates: list[dict[str, Any]], report: dict[str, Any]) -> None:
    write_json(out / CANDIDATES_FILE, {"kind": base.kind, "base_tokenizer": str(base.file),
                                       "base_sha256": file_digest(base.file), "report": report,
                                       "candidates": candidates})


def read_candidates(folder: str | Path, base: BaseTokenizer) -> dict[str, Any]:
    """The domain tokenizer's candidates, refused when they were trained against another base tokenizer."""
    path = Path(folder) / CANDIDATES_FILE
    if not path.is_file():
        raise UserError(f"train.output_dir: {path} not found; train the domain tokenizer first: "
                        "uv run python tokenizer/train_domain_tokenizer.py --config <the same YAML>")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("base_sha256") != file_digest(base.file):
        raise UserError(f"{path}: the domain tokenizer was trained against {data.get('base_tokenizer')}, not "
                        f"against base_tokenizer {base.file} (a different file); train it again (overwrite=true)")
    return data


def hf_tokenizer(folder: str | Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)


def hf_side(tokenizer: Any) -> Side:
    """A transformers tokenizer as the checks see it: what continued pretraining will encode."""
    return Side(lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [],
                lambda ids: tokenizer.decode(ids), tokenizer.get_vocab())


def hf_preserved(base: Any, merged: Any) -> dict[str, bool]:
    """Special tokens (with their ids) and the chat template, compared between the base and the merged tokenizer."""
    specials = dict(zip(base.all_special_tokens, base.all_special_ids))
    same = {"special_tokens_preserved": specials == dict(zip(merged.all_special_tokens, merged.all_special_ids)),
            "chat_template_preserved": getattr(base, "chat_template", None) == getattr(merged, "chat_template", None)}
    if not all(same.values()):
        raise UserError(f"internal check failed, nothing was written: {same}. Please report.")
    return same


# ---- measurements and checks ------------------------------------------------------------------------------
@dataclass
class Side:
    """One tokenizer as the checks see it: batch encode (no special tokens), decode, and its vocabulary."""

    encode: Callable[[list[str]], list[list[int]]]
    decode: Callable[[list[int]], str]
    vocab: dict[str, int]


def compression(before: list[list[int]], after: list[list[int]], texts: list[str]) -> dict[str, Any]:
    """Tokens per character of `texts` under the base (`before`) and the merged (`after`) tokenizer."""
    if not texts:
        return {}
    chars, tok_before, tok_after = sum(map(len, texts)), sum(map(len, before)), sum(map(len, after))
    return {"documents": len(texts), "characters": chars, "tokens_before": tok_before, "tokens_after": tok_after,
            "tokens_per_char_before": round(tok_before / chars, 4),
            "tokens_per_char_after": round(tok_after / chars, 4),
            "token_reduction": round(1 - tok_after / tok_before, 4)}


def verify_extension(before: Side, after: Side, new_ids: set[int], train: list[str],
                     held_out: list[str]) -> dict[str, Any]:
    """What the merge promises, measured: old ids unchanged, text without new tokens encoded as before, round trip,
    new tokens in use, tokens per character. A broken promise raises (nothing is written)."""
    moved = [f"{t!r}: {i} -> {after.vocab.get(t)}" for t, i in before.vocab.items() if after.vocab.get(t) != i]
    missing = sorted(new_ids - set(after.vocab.values()))
    docs = train + held_out
    ids_before, ids_after = before.encode(docs), after.encode(docs)
    # Text holding none of the new tokens must encode exactly as before: the corpus's documents without them, and
    # unrelated probes (English, code, emoji, other scripts), where the domain may still have added a word.
    probe_before, probe_after = before.encode(PROBE_TEXTS), after.encode(PROBE_TEXTS)
    plain = [k for k, ids in enumerate(ids_after) if not new_ids.intersection(ids)]
    plain_equal = sum(ids_before[k] == ids_after[k] for k in plain)
    probes = [k for k, ids in enumerate(probe_after) if not new_ids.intersection(ids)]
    probe_equal = sum(probe_before[k] == probe_after[k] for k in probes)
    if moved or missing or probe_equal < len(probes) or plain_equal < len(plain):
        raise UserError(f"internal check failed, nothing was written: {len(moved)} old token(s) changed id "
                        f"{moved[:3]}; {len(missing)} new id(s) missing; {len(probes) - probe_equal} unrelated "
                        f"text(s) and {len(plain) - plain_equal} document(s) without new tokens encode differently. "
                        "Please report.")
    used = set().union(*(new_ids.intersection(ids) for ids in ids_after)) if ids_after else set()
    n = len(train)
    return {
        "old_ids_preserved": True,
        "tokens_per_char": {"held_out": compression(ids_before[n:], ids_after[n:], held_out),
                            "train": compression(ids_before[:n], ids_after[:n], train)},
        "round_trip": {"documents": len(docs),
                       "equal_before": sum(before.decode(i) == t for i, t in zip(ids_before, docs)),
                       "equal_after": sum(after.decode(i) == t for i, t in zip(ids_after, docs))},
        "unchanged": {"probe_texts": len(PROBE_TEXTS), "probe_texts_without_new_tokens": len(probes),
                      "probe_equal": probe_equal,
                      "documents_without_new_tokens": len(plain), "documents_equal": plain_equal},
        "new_tokens_used": len(used),
    }


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The report in a few lines, printed by merge_tokenizer.py."""
    lines = [f"vocabulary: {report['vocab_before']} -> {report['vocab_after']} tokens "
             f"(+{report['new_tokens_count']}: {report['counts']})"]
    for name in ("held_out", "train"):
        m = report["tokens_per_char"].get(name)
        if m:
            lines.append(f"tokens per character, {name.replace('_', '-')} text ({m['characters']} chars): "
                         f"{m['tokens_per_char_before']} -> {m['tokens_per_char_after']} "
                         f"({100 * m['token_reduction']:.1f}% fewer tokens)")
    rt = report["round_trip"]
    lines.append(f"round trip decode(encode(x)) == x: {rt['equal_after']}/{rt['documents']} documents "
                 f"(base tokenizer: {rt['equal_before']})")
    un = report["unchanged"]
    lines.append(f"text without new tokens encodes as before: {un['probe_equal']}/"
                 f"{un['probe_texts_without_new_tokens']} unrelated texts ({un['probe_texts']} tried), "
                 f"{un['documents_equal']}/{un['documents_without_new_tokens']} corpus documents")
    lines.append(f"new tokens used by normal encoding of the corpus: {report['new_tokens_used']}")
    return lines
