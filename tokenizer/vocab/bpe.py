"""Vocabulary extension for byte-level BPE tokenizers (Qwen2, Llama-3, DeepSeek, GPT-2): train a domain BPE with
HF `tokenizers`, then add its tokens to the base **with the merges that build them**, so that normal encoding
produces them (an added token would only be matched as a whole string, outside BPE).

How a new token is made reachable: its byte-level form is segmented by the current merged model into pieces. Two
pieces: one merge `(p1, p2)` whose result is the new token. More: the shorter candidates are added first, in
rounds (a candidate's pieces often become two after its prefix was added); what still has three or more pieces
gets a left-to-right chain `(p1, p2) -> p1p2, (p1p2, p3) -> ...` whose intermediate results are new tokens too
(counted as `intermediate`). Every new merge is appended after the base merges (lowest priority) and produces a
token the base does not have, so text that contains none of the new tokens tokenizes exactly as before.

Ids: tokenizers gives an added token that is missing from the BPE vocabulary the id `len(vocab) + k`, whatever
tokenizer.json says; Qwen2's special tokens (151643+) sit right after its BPE vocabulary. So the added tokens are
first reserved at their own ids inside the BPE vocabulary (each maps to itself and no merge produces it), and
the new tokens take the ids after the last one in use: every old id stays identical.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from self_model.core.errors import UserError
from tokenizer.vocab.extend import Side, space_variant

logger = logging.getLogger("self_model")

BYTE_ALPHABET = 256


def _has_byte_level(node: Any) -> bool:
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(_has_byte_level(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_byte_level(v) for v in node)
    return False


def bpe_problem(tok_json: dict[str, Any]) -> str | None:
    """None when tokenizer.json is a byte-level BPE this module can extend, else what it is."""
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE":
        return f"a {model.get('type', 'unknown')} model, not BPE"
    if not _has_byte_level(tok_json.get("pre_tokenizer")):
        return ("a BPE model without a ByteLevel pre-tokenizer (a converted SentencePiece tokenizer: give the folder "
                "holding its tokenizer.model)")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "a BPE model with a subword prefix / word suffix"
    return None


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def contiguous_vocab(tok_json: dict[str, Any]) -> dict[str, int]:
    """The BPE vocabulary with every added token reserved at its own id; the ids must then be exactly 0..N-1."""
    vocab = dict(tok_json["model"]["vocab"])
    taken = {i: t for t, i in vocab.items()}
    for added in tok_json.get("added_tokens", []):
        content, idx = added["content"], added["id"]
        if content in vocab:
            if vocab[content] != idx:
                raise UserError(f"base tokenizer.json: added token {content!r} has id {idx} but the BPE vocabulary "
                                f"gives it {vocab[content]}; the base tokenizer is inconsistent")
            continue
        if idx in taken:
            raise UserError(f"base tokenizer.json: added token {content!r} reuses id {idx} of {taken[idx]!r}")
        vocab[content], taken[idx] = idx, content
    if sorted(vocab.values()) != list(range(len(vocab))):
        unused = max(vocab.values()) + 1 - len(vocab)
        raise UserError(f"base tokenizer.json: its ids have gaps ({unused} unused below {max(vocab.values())}); new "
                        "tokens could not be given ids without moving old ones. Unsupported.")
    return vocab


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model["merges"]]  # type: ignore


def _segmenter(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Any:
    from tokenizers import models

    return models.BPE(vocab=vocab, merges=merges)


# ---- the domain tokenizer ---------------------------------------------------------------------------------
def train_domain_bpe(base_file: Path, texts: list[str], vocab_size: int, min_frequency: int) -> Any:
    """A byte-level BPE trained on `texts` with the base's normalizer and pre-tokenizer: its tokens never cross a
    boundary the base pre-tokenizer draws, so each of them can be reached inside the base."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if vocab_size <= BYTE_ALPHABET:
        raise UserError(f"train.vocab_size: {vocab_size} leaves no room for merges: a byte-level BPE starts from "
                        f"{BYTE_ALPHABET} byte symbols; use e.g. 4000")
    base = Tokenizer.from_file(str(base_file))
    domain = Tokenizer(models.BPE())
    if base.normalizer is not None:
        domain.normalizer = base.normalizer
    domain.pre_tokenizer = base.pre_tokenizer
    domain.decoder = base.decoder
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    domain.train_from_iterator(texts, trainer=trainer, length=len(texts))
    got = domain.get_vocab_size()
    if got < vocab_size:
        raise UserError(f"corpus too small for train.vocab_size {vocab_size}: {len(texts)} documents "
                        f"({sum(map(len, texts))} characters) yield only {got} tokens with train.min_frequency "
                        f"{min_frequency}. Set train.vocab_size: {got} (or less), lower train.min_frequency, or add "
                        "text.")
    return domain


def domain_candidates(domain: Any, base_vocab: dict[str, int]) -> tuple[list[str], int]:
    """The domain tokens the base lacks, in the order the domain BPE learned them; and how many it already had."""
    ordered = [t for t, _ in sorted(domain.get_vocab().items(), key=lambda kv: kv[1])]
    new = [t for t in ordered if t not in base_vocab]
    return new, len(ordered) - len(new)


def word_list_forms(base_file: Path, words: list[str], base_vocab: dict[str, int]) -> tuple[list[str], dict[str, Any]]:
    """Each word's byte-level form (and its space-prefixed form for Latin words). A word the base pre-tokenizer
    splits can never be one BPE token; a word the base already has needs nothing: both are reported, not added."""
    from tokenizers import Tokenizer

    base = Tokenizer.from_file(str(base_file))
    forms: list[str] = []
    existing, split = [], []
    for word in words:
        for text in [word, " " + word] if space_variant(word) else [word]:
            normalized = base.normalizer.normalize_str(text) if base.normalizer is not None else text
            pieces = base.pre_tokenizer.pre_tokenize_str(normalized)
            if len(pieces) != 1:
                if text == word:
                    split.append({"word": word, "pre_tokens": [base.decoder.decode([p]) for p, _ in pieces]})
                continue
            form = pieces[0][0]
            if form in base_vocab:
                existing.append(text)
            elif form not in forms:
                forms.append(form)
    report = {"words": len(words), "added_forms": len(forms), "already_in_base": existing,
              "split_by_pre_tokenizer": split}
    if existing:
        logger.warning("train.word_list: %d word(s) already in the base tokenizer, skipped: %s", len(existing),
                       existing[:10])
    if split:
        logger.warning("train.word_list: %d word(s) span a boundary of the base pre-tokenizer, so BPE can never "
                       "produce them as one token; skipped: %s", len(split), [s["word"] for s in split[:10]])
    return forms, report


# ---- the merge --------------------------------------------------------------------------------------------
@dataclass
class NewToken:
    id: int
    token: str  # model form (byte-level string / SentencePiece piece)
    text: str  # decoded
    source: str  # domain | word_list | intermediate
    sub_token_ids: list[int] = field(default_factory=list)  # the base tokenizer's ids for the same text


@dataclass
class BpeMerge:
    tokenizer_json: dict[str, Any]
    new_tokens: list[NewToken]
    base_size: int
    skipped: dict[str, list[str]]

    def report(self) -> dict[str, Any]:
        return {"new_tokens": [asdict(t) for t in self.new_tokens], "skipped": self.skipped}


def merge_bpe(base_json: dict[str, Any], candidates: list[tuple[str, str]]) -> BpeMerge:
    """Add `candidates` ((byte-level form, source) in priority order) to the base with the merges that build them."""
    vocab = contiguous_vocab(base_json)
    base_size = len(vocab)
    merges = _merge_pairs(base_json["model"])
    base_model = _segmenter(vocab, merges)
    new_merges: list[tuple[str, str]] = []
    pairs: set[tuple[str, str]] = set()
    sources: dict[str, str] = {}
    skipped: dict[str, list[str]] = {"unreachable": []}

    def add(token: str, left: str, right: str, source: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)
            sources[token] = source
        if (left, right) not in pairs:
            pairs.add((left, right))
            new_merges.append((left, right))

    alphabet = {t for t in vocab if len(t) == 1}
    pending, seen = [], set()
    for form, source in candidates:
        if form in vocab or form in seen:
            continue
        seen.add(form)
        if not set(form) <= alphabet:
            skipped["unreachable"].append(form)
            continue
        pending.append((form, source))
    while pending:  # rounds: candidates that are two pieces of the current model need one merge
        model, rest, progressed = _segmenter(vocab, merges + new_merges), [], False
        for form, source in pending:
            if form in vocab:
                continue
            pieces = [t.value for t in model.tokenize(form)]
            if len(pieces) == 2:
                add(form, pieces[0], pieces[1], source)
                progressed = True
            else:
                rest.append((form, source))
        pending = rest
        if not progressed:
            break
    model = _segmenter(vocab, merges + new_merges)
    for form, source in pending:  # the rest: a chain whose intermediate results are new tokens too
        if form in vocab:
            continue
        pieces = [t.value for t in model.tokenize(form)]
        steps = ["".join(pieces[:i + 1]) for i in range(1, len(pieces))]
        if any(s in vocab and vocab[s] < base_size for s in steps):
            skipped["unreachable"].append(form)  # a merge would build an old token: old text could change
            continue
        for i, step in enumerate(steps):
            add(step, steps[i - 1] if i else pieces[0], pieces[i + 1], source if step == form else "intermediate")
    merged = json.loads(json.dumps(base_json))
    merged["model"]["vocab"] = vocab
    as_str = bool(base_json["model"]["merges"]) and isinstance(base_json["model"]["merges"][0], str)
    merged["model"]["merges"] = [f"{a} {b}" if as_str else [a, b] for a, b in merges + new_merges]
    new_tokens = _describe(base_json, base_model, vocab, base_size, sources)
    return BpeMerge(merged, new_tokens, base_size, skipped)


def _describe(base_json: dict[str, Any], base_model: Any, vocab: dict[str, int], base_size: int,
              sources: dict[str, str]) -> list[NewToken]:
    from tokenizers import Tokenizer

    decoder = Tokenizer.from_str(json.dumps(base_json)).decoder
    out = []
    for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        if idx >= base_size:
            subs = [t.id for t in base_model.tokenize(token)]
            out.append(NewToken(idx, token, decoder.decode([token]), sources[token], subs))
    return out


def load_merged(merged_json: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(merged_json))


# ---- the two steps ----------------------------------------------------------------------------------------
def train_bpe(base_file: Path, texts: list[str], words: list[str], vocab_size: int, min_frequency: int,
              out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train and save the domain tokenizer (`out/tokenizer.json`); return the candidates (word list first: the
    user's words win where they overlap a learned token) and the report."""
    base_vocab = contiguous_vocab(load_json(base_file))
    domain = train_domain_bpe(base_file, texts, vocab_size, min_frequency)
    domain.save(str(out / "tokenizer.json"))
    learned, known = domain_candidates(domain, base_vocab)
    forms, words_report = word_list_forms(base_file, words, base_vocab) if words else ([], {})
    candidates = [{"token": f, "source": "word_list"} for f in forms]
    candidates += [{"token": t, "source": "domain"} for t in learned if t not in set(forms)]
    report = {"domain_vocab_size": domain.get_vocab_size(), "domain_tokens_in_base": known,
              "domain_tokens_new": len(learned), "word_list": words_report, "candidates": len(candidates)}
    return candidates, report


def write_merged_bpe(base_folder: Path, base_file: Path, candidates: list[dict[str, Any]], out: Path,
                     trust_remote_code: bool) -> tuple[dict[str, Any], Side, Side, set[int]]:
    """Write the merged tokenizer into `out` (the merged tokenizer.json + the base's side files: chat template,
    special tokens) and load both with transformers, as training will. Returns the merge report, the two
    tokenizers as the checks see them, and the new ids."""
    from tokenizer.vocab.extend import copy_side_files, hf_preserved, hf_side, hf_tokenizer

    result = merge_bpe(load_json(base_file), [(c["token"], c["source"]) for c in candidates])
    load_merged(result.tokenizer_json)  # tokenizers itself must accept it
    copy_side_files(base_folder, out)
    (out / "tokenizer.json").write_text(json.dumps(result.tokenizer_json, ensure_ascii=False), encoding="utf-8")
    base_tok, merged_tok = hf_tokenizer(base_folder, trust_remote_code), hf_tokenizer(out, trust_remote_code)
    report = {"vocab_before": len(base_tok), "vocab_after": len(merged_tok), **hf_preserved(base_tok, merged_tok),
              **result.report()}
    return report, hf_side(base_tok), hf_side(merged_tok), {t.id for t in result.new_tokens}
