"""Vocabulary extension for SentencePiece tokenizers (Llama-2, Baichuan, ChatGLM): train a domain SentencePiece
model with the base's own settings, then append its pieces to the base model's protobuf.

Old pieces keep their index, hence their id. A BPE model merges adjacent symbols by the score of the piece they
form: the new pieces get scores below every base piece (lowest priority, like the appended BPE merges of
`vocab_bpe.py`), in the order the domain model learned them; a unigram model takes the domain model's own
log-probabilities. A new piece only forms where its text occurs, so text without new pieces encodes as before.
Every new piece is checked to be produced by normal encoding of its own text; a BPE piece that is not gets the
pieces leading to it (left to right) first, and is dropped (reported) if it still is not.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from self_model.core.errors import UserError
from tokenizer.vocab.bpe import NewToken
from tokenizer.vocab.extend import Side, space_variant

logger = logging.getLogger("self_model")

SPACE = "\u2581"  # the piece form of a space
NORMAL, CONTROL = 1, 3
MODEL_TYPES = {1: "unigram", 2: "bpe"}
BUILTIN_RULES = ("nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "identity")


def sp_pb2() -> Any:
    """The SentencePiece `ModelProto` classes: sentencepiece's own, or transformers' copy of the same schema when
    sentencepiece's generated module needs a newer protobuf runtime than the one installed."""
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        raise UserError("the base tokenizer is a SentencePiece model: install sentencepiece and protobuf "
                        "(pip install sentencepiece protobuf)") from None
    try:
        from sentencepiece import sentencepiece_model_pb2

        return sentencepiece_model_pb2
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own VersionError, not an ImportError
        try:
            from transformers.utils import sentencepiece_model_pb2_new

            logger.info("sentencepiece's protobuf module does not load (%s); using transformers' copy of the same "
                        "schema", str(exc).split(".")[0])
            return sentencepiece_model_pb2_new
        except ImportError:
            raise UserError(f"cannot read SentencePiece models: {exc}") from None


def load_proto(path: Path) -> Any:
    proto = sp_pb2().ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - a corrupt file: one message naming it
        raise UserError(f"{path}: not a SentencePiece model ({exc})") from None
    if proto.trainer_spec.model_type not in MODEL_TYPES:
        raise UserError(f"{path}: a SentencePiece model of type {proto.trainer_spec.model_type} (word / char); "
                        "only BPE and unigram models can be extended")
    return proto


def processor(proto: Any, raw: bool = False) -> Any:
    """A SentencePieceProcessor for `proto`; raw: without the dummy prefix and whitespace cleanup, to segment a
    piece's own text."""
    import sentencepiece as spm

    if raw:
        proto = _copy(proto)
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.remove_extra_whitespaces = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def sp_side(proto: Any) -> Side:
    sp = processor(proto)
    return Side(lambda texts: sp.encode(texts), lambda ids: sp.decode(ids),
                {sp.id_to_piece(i): i for i in range(sp.get_piece_size())})


def _copy(proto: Any) -> Any:
    twin = type(proto)()
    twin.CopyFrom(proto)
    return twin


def text_of(piece: str) -> str:
    return piece.replace(SPACE, " ")


# ---- the domain model -------------------------------------------------------------------------------------
def train_domain_sp(base: Any, texts: list[str], vocab_size: int, character_coverage: float) -> Any:
    """A SentencePiece model of the base's type, trained on `texts` with the base's normalization and splitting."""
    import sentencepiece as spm

    spec, norm = base.trainer_spec, base.normalizer_spec
    rule = norm.name if norm.name in BUILTIN_RULES else "identity"
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=writer, model_type=MODEL_TYPES[spec.model_type],
            vocab_size=vocab_size, character_coverage=character_coverage, normalization_rule_name=rule,
            add_dummy_prefix=norm.add_dummy_prefix, remove_extra_whitespaces=norm.remove_extra_whitespaces,
            split_digits=spec.split_digits, split_by_whitespace=spec.split_by_whitespace,
            split_by_unicode_script=spec.split_by_unicode_script, split_by_number=spec.split_by_number,
            treat_whitespace_as_suffix=spec.treat_whitespace_as_suffix,
            allow_whitespace_only_pieces=spec.allow_whitespace_only_pieces,
            max_sentencepiece_length=spec.max_sentencepiece_length or 16, byte_fallback=False, minloglevel=2,
            num_threads=os.cpu_count() or 1, max_sentence_length=max(4192, *(len(t.encode()) + 1 for t in texts)))
    except RuntimeError as exc:
        raise UserError(_training_error(str(exc), vocab_size, character_coverage, texts)) from None
    proto = sp_pb2().ModelProto()
    proto.ParseFromString(writer.getvalue())
    return proto


def _training_error(message: str, vocab_size: int, coverage: float, texts: list[str]) -> str:
    if "Vocabulary size too high" in message:
        limit = message.rsplit("<=", 1)[-1].strip(" .")
        return (f"corpus too small for train.vocab_size {vocab_size}: SentencePiece can make at most {limit} pieces "
                f"from {len(texts)} documents ({sum(map(len, texts))} characters). Set train.vocab_size: {limit} "
                "(or less), or add text.")
    if "smaller than required_chars" in message:
        return (f"train.vocab_size {vocab_size} is smaller than the number of characters the corpus needs at "
                f"train.character_coverage {coverage} ({message.split('.')[-3].strip()}); raise train.vocab_size or "
                "lower train.character_coverage")
    return f"SentencePiece training failed: {message}"


def domain_candidates(domain: Any, base: Any, texts: list[str], min_frequency: int) -> tuple[list[dict[str, Any]],
                                                                                             dict[str, int]]:
    """The domain model's normal pieces the base lacks, in the domain model's order, whose text occurs at least
    `min_frequency` times in the normalized corpus."""
    existing = {p.piece for p in base.pieces}
    corpus = "\n".join(processor(domain).normalize(texts))
    out, rare, known = [], 0, 0
    for piece in domain.pieces:
        if piece.type != NORMAL:
            continue
        if piece.piece in existing:
            known += 1
        elif corpus.count(piece.piece) < min_frequency:
            rare += 1
        else:
            out.append({"token": piece.piece, "source": "domain", "score": piece.score})
    return out, {"already_in_base": known, "below_min_frequency": rare}


def word_list_pieces(base: Any, words: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each word as a piece (normalized like the base; the space-prefixed form too for Latin words). A word with a
    space inside can never be one piece when the base splits by whitespace; a word the base has needs nothing."""
    raw = processor(base, raw=True)
    existing = {p.piece for p in base.pieces}
    out: list[dict[str, Any]] = []
    known, split = [], []
    for word in words:
        for text in [word, " " + word] if space_variant(word) else [word]:
            piece = raw.normalize(text)
            if base.trainer_spec.split_by_whitespace and SPACE in piece[1:]:
                if text == word:
                    split.append({"word": word, "pre_tokens": piece.split(SPACE)})
                continue
            if piece in existing:
                known.append(text)
            elif piece not in [c["token"] for c in out]:
                out.append({"token": piece, "source": "word_list", "score": None})
    if known:
        logger.warning("train.word_list: %d word(s) already in the base tokenizer, skipped: %s", len(known),
                       known[:10])
    if split:
        logger.warning("train.word_list: %d word(s) hold a space and the base splits at whitespace; skipped: %s",
                       len(split), [s["word"] for s in split[:10]])
    return out, {"words": len(words), "added_forms": len(out), "already_in_base": known,
                 "split_by_pre_tokenizer": split}


# ---- the merge --------------------------------------------------------------------------------------------
@dataclass
class SpMerge:
    proto: Any
    new_tokens: list[NewToken]
    base_size: int
    skipped: dict[str, list[str]]

    def report(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"new_tokens": [asdict(t) for t in self.new_tokens], "skipped": self.skipped}


def reserved_tokens(folder: Path, base_size: int) -> list[str]:
    """Tokens tokenizer_config.json adds after the SentencePiece vocabulary: they keep their ids (as control
    pieces, matched only by the added-token layer), and the new pieces come after them."""
    path = folder / "tokenizer_config.json"
    added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens_decoder", {}) if path.is_file() else {}
    after = sorted((int(i), t["content"] if isinstance(t, dict) else str(t)) for i, t in added.items()
                   if int(i) >= base_size)
    if [i for i, _ in after] != list(range(base_size, base_size + len(after))):
        raise UserError(f"{path}: added tokens after the SentencePiece vocabulary ({base_size} pieces) have gaps in "
                        f"their ids ({[i for i, _ in after][:8]}...); new pieces could not be placed without moving "
                        "them. Unsupported.")
    return [t for _, t in after]


def merge_sp(base: Any, candidates: list[dict[str, Any]], reserved: list[str]) -> SpMerge:
    """Append `candidates` to the base model (after the `reserved` tokens); keep only pieces that normal encoding
    of their own text produces."""
    is_bpe = MODEL_TYPES[base.trainer_spec.model_type] == "bpe"
    existing = {p.piece for p in base.pieces} | set(reserved)
    order = list({c["token"]: c for c in candidates if c["token"] not in existing}.values())
    skipped: dict[str, list[str]] = {"unreachable": []}
    base_raw = processor(base, raw=True)
    for attempt in range(8):
        proto = _build(base, reserved, order, is_bpe)
        raw = processor(proto, raw=True)
        bad = [c for c in order if raw.encode(text_of(c["token"])) != [raw.piece_to_id(c["token"])]]
        if not bad:
            break
        if attempt == 0 and is_bpe:  # give each the pieces leading to it, left to right
            order = _with_intermediates(order, bad, raw, existing)
        else:
            skipped["unreachable"] += [c["token"] for c in bad]
            order = [c for c in order if c not in bad]
    else:
        raise UserError("internal error: SentencePiece pieces stay unreachable after 8 rounds; please report")
    first = len(base.pieces) + len(reserved)
    new_tokens = [NewToken(first + i, c["token"], text_of(c["token"]), c["source"],
                           base_raw.encode(text_of(c["token"]))) for i, c in enumerate(order)]
    return SpMerge(proto, new_tokens, len(base.pieces), skipped)


def _with_intermediates(order: list[dict[str, Any]], bad: list[dict[str, Any]], raw: Any,
                        existing: set[str]) -> list[dict[str, Any]]:
    have = existing | {c["token"] for c in order}
    bad_ids = {id(c) for c in bad}
    out = []
    for c in order:
        if id(c) in bad_ids:
            units = _units(raw, text_of(c["token"]))
            for i in range(1, len(units)):  # a character the base spells in bytes becomes a piece too
                step = "".join(units[:i])
                if step not in have:
                    have.add(step)
                    out.append({"token": step, "source": "intermediate", "score": c["score"]})
        out.append(c)
    return out


def _units(sp: Any, text: str) -> list[str]:
    """`text` as segmented by `sp`, with byte-fallback pieces joined back into the characters they spell."""
    out, pending = [], b""
    for i in sp.encode(text):
        if not sp.is_byte(i):
            out.append(sp.id_to_piece(i))
            continue
        pending += bytes([int(sp.id_to_piece(i)[3:5], 16)])
        try:
            out.append(pending.decode("utf-8"))
            pending = b""
        except UnicodeDecodeError:
            continue  # the character's remaining bytes follow
    return out


def _build(base: Any, reserved: list[str], order: list[dict[str, Any]], is_bpe: bool) -> Any:
    proto = _copy(base)
    for token in reserved:
        proto.pieces.add(piece=token, score=0.0, type=CONTROL)
    low = min((p.score for p in base.pieces if p.type == NORMAL), default=0.0)
    scores = [c["score"] for c in order if c["score"] is not None]
    floor = min(scores, default=low)
    for i, c in enumerate(order):
        score = low - 1.0 - i if is_bpe else (c["score"] if c["score"] is not None else floor)
        proto.pieces.add(piece=c["token"], score=score, type=NORMAL)
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto


# ---- the two steps ----------------------------------------------------------------------------------------
def train_sp(base_file: Path, texts: list[str], words: list[str], vocab_size: int, min_frequency: int,
             character_coverage: float, out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train and save the domain model (`out/domain_sp.model`); return the candidates (word list first) and the
    report."""
    base = load_proto(base_file)
    domain = train_domain_sp(base, texts, vocab_size, character_coverage)
    (out / "domain_sp.model").write_bytes(domain.SerializeToString())
    learned, counts = domain_candidates(domain, base, texts, min_frequency)
    listed, words_report = word_list_pieces(base, words) if words else ([], {})
    mine = {c["token"] for c in listed}
    candidates = listed + [c for c in learned if c["token"] not in mine]
    report = {"domain_vocab_size": len(domain.pieces),
              "domain_model_type": MODEL_TYPES[domain.trainer_spec.model_type],
              "domain_tokens_in_base": counts["already_in_base"], "domain_tokens_below_min_frequency":
              counts["below_min_frequency"], "domain_tokens_new": len(learned), "word_list": words_report,
              "candidates": len(candidates)}
    return candidates, report


def write_merged_sp(base_folder: Path, base_file: Path, candidates: list[dict[str, Any]], out: Path,
                    trust_remote_code: bool) -> tuple[dict[str, Any], Side, Side, set[int]]:
    """Write the merged model under the base's file name plus the base's side files (not a tokenizer.json: it
    would hold the old vocabulary; transformers converts the .model when it loads the folder)."""
    from tokenizer.vocab.extend import copy_side_files, hf_tokenizer

    base = load_proto(base_file)
    reserved = reserved_tokens(base_folder, len(base.pieces))
    result = merge_sp(base, candidates, reserved)
    copy_side_files(base_folder, out)
    (out / base_file.name).write_bytes(result.proto.SerializeToString())
    report = {"vocab_before": len(base.pieces) + len(reserved), "vocab_after": len(result.proto.pieces),
              "reserved_added_tokens": reserved, **result.report()}
    new_ids = {t.id for t in result.new_tokens}
    try:  # the ids as transformers sees them, where this environment lets it read SentencePiece models
        base_tok, merged_tok = hf_tokenizer(base_folder, trust_remote_code), hf_tokenizer(out, trust_remote_code)
        moved = [t for t, i in base_tok.get_vocab().items() if merged_tok.get_vocab().get(t) != i]
        report["transformers_check"] = {"tokens": len(merged_tok), "old_ids_moved": len(moved)}
        if moved or len(merged_tok) != len(base_tok) + len(new_ids):
            raise UserError(f"internal check failed, nothing was written: transformers loads the merged tokenizer "
                            f"with {len(moved)} old token(s) moved ({moved[:3]}) and {len(merged_tok)} tokens")
    except (OSError, ValueError, ImportError) as exc:
        logger.warning("transformers could not load the SentencePiece tokenizer here (%s); the ids were checked "
                       "with sentencepiece itself", str(exc).split("\n")[0][:200])
        report["transformers_check"] = f"skipped: {type(exc).__name__}: {str(exc)[:200]}"
    return report, sp_side(base), sp_side(result.proto), new_ids
