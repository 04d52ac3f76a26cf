"""Vocabulary extension of a SentencePiece tokenizer (Llama-2 / Baichuan style): a small SentencePiece BPE base
(byte fallback, a token added after its vocabulary in tokenizer_config.json) trained here on the sample chat
data, extended with the sample pretraining text, then a tiny untied Llama model resized to it."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

spm = pytest.importorskip("sentencepiece", reason="sentencepiece (dev dependency) is not installed")

from self_model.core.config import load_config  # noqa: E402 (after the importorskip)
from self_model.core.errors import UserError  # noqa: E402 (after the importorskip)
from self_model.core.vocab_file import EXTENSION_FILE  # noqa: E402 (after the importorskip)
from tokenizer import merge_tokenizer, resize_model, train_domain_tokenizer  # noqa: E402 (after the importorskip)
from tokenizer.vocab.extend import ExtendConfig  # noqa: E402 (after the importorskip)
from tokenizer.vocab.spm import load_proto  # noqa: E402 (after the importorskip)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data_process" / "sample_data"


BASE_PIECES = 1200
RESERVED = "<|reserved_0|>"  # an added token right after the SentencePiece vocabulary, id 1200


def chat_texts() -> list[str]:
    texts: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            [walk(v) for v in value.values()]
        elif isinstance(value, list):
            [walk(v) for v in value]

    for name in ("sft_train.jsonl", "sft_messages.jsonl", "sft_alpaca.jsonl", "dpo_train.jsonl"):
        for line in (SAMPLE / name).read_text(encoding="utf-8").splitlines():
            walk(json.loads(line))
    return texts


def make_base(folder: Path) -> Path:
    folder.mkdir(parents=True)
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(chat_texts()), model_writer=writer, model_type="bpe",
                                   vocab_size=BASE_PIECES, byte_fallback=True, character_coverage=0.98,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   split_digits=True, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(writer.getvalue())
    added = {str(i): {"content": c, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False} for i, c in [(0, "<unk>"), (1, "<s>"), (2, "</s>"), (1200, RESERVED)]}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "added_tokens_decoder": added, "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}),
        encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def sp_extended(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    tmp = tmp_path_factory.mktemp("sp_extend")
    base = make_base(tmp / "sp_base")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=BASE_PIECES + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp / "tiny_llama")
    values = {"base_tokenizer": base, "base_model": tmp / "tiny_llama", "train.vocab_size": 2000,
              "train.character_coverage": 0.98, "train.output_dir": tmp / "domain",
              "merge.output_dir": tmp / "merged_tokenizer", "resize.output_dir": tmp / "merged_model"}
    cfg = load_config(ExtendConfig, ROOT / "config" / "tokenizer_config" / "extend.yaml",
                      [f"{k}={v}" for k, v in values.items()])
    train_domain_tokenizer.main(cfg)
    merged = merge_tokenizer.main(cfg)
    model = resize_model.main(cfg)
    return {"cfg": cfg, "base": base, "merged": merged, "model": model, "tmp": tmp,
            "report": json.loads((merged / EXTENSION_FILE).read_text(encoding="utf-8"))}


def processors(ext: dict[str, Any]) -> tuple[Any, Any]:
    return (spm.SentencePieceProcessor(model_file=str(ext["base"] / "tokenizer.model")),
            spm.SentencePieceProcessor(model_file=str(ext["merged"] / "tokenizer.model")))


def corpus() -> list[str]:
    return [ln for f in ("pretrain.txt", "pretrain_eval.txt")
            for ln in (SAMPLE / f).read_text(encoding="utf-8").splitlines() if ln.strip()]


def test_old_pieces_keep_ids_scores_and_types(sp_extended: dict[str, Any]) -> None:
    base = load_proto(sp_extended["base"] / "tokenizer.model")
    merged = load_proto(sp_extended["merged"] / "tokenizer.model")
    assert [(p.piece, p.score, p.type) for p in merged.pieces[:BASE_PIECES]] == \
        [(p.piece, p.score, p.type) for p in base.pieces]
    assert (merged.pieces[BASE_PIECES].piece, merged.pieces[BASE_PIECES].type) == (RESERVED, 3)  # control
    new = sp_extended["report"]["new_tokens"]
    assert [t["id"] for t in new] == list(range(BASE_PIECES + 1, len(merged.pieces))) and len(new) > 500
    assert sp_extended["report"]["vocab_before"] == BASE_PIECES + 1
    # New pieces rank below every base piece (BPE merges them last).
    assert max(p.score for p in merged.pieces[BASE_PIECES + 1:]) < min(p.score for p in base.pieces if p.type == 1)
    assert (sp_extended["merged"] / "tokenizer_config.json").is_file()


def test_new_pieces_are_produced_by_normal_encoding(sp_extended: dict[str, Any]) -> None:
    base, merged = processors(sp_extended)
    raw = sp_extended["report"]["new_tokens"]
    docs = corpus()
    ids = merged.encode(docs)
    assert all(merged.decode(x) == d for x, d in zip(ids, docs))
    used = {i for x in ids for i in x if i > BASE_PIECES}
    assert len(used) > 0.5 * len(raw)
    assert sum(map(len, ids)) < 0.8 * sum(map(len, base.encode(docs)))
    # The word list: 布洛芬 is spelled in bytes by the base (its characters are unknown there), one piece now.
    assert len(base.encode("服用布洛芬")) > 6 and "布洛芬" in merged.encode("服用布洛芬", out_type=str)
    words = sp_extended["report"]["training"]["word_list"]
    assert "高血压" in words["already_in_base"] and sp_extended["report"]["skipped"]["unreachable"] == []


def test_text_without_new_pieces_encodes_as_before(sp_extended: dict[str, Any]) -> None:
    """Text made of characters that occur in no new piece cannot contain a new piece: its ids are unchanged."""
    base, merged = processors(sp_extended)
    in_new = {c for t in sp_extended["report"]["new_tokens"] for c in t["text"]}
    chars = [base.id_to_piece(i) for i in range(BASE_PIECES) if len(base.id_to_piece(i)) == 1
             and base.id_to_piece(i) not in in_new and not base.is_control(i)]
    assert len(chars) >= 20
    texts = ["".join(chars[i::3]) for i in range(3)] + ["😀½∞🏽"]  # no spaces: ' ' is in new pieces ('▁...')
    texts = [t for t in texts if not in_new & set(t)]
    assert len(texts) == 4
    for text in texts:
        assert merged.encode(text) == base.encode(text), text


def test_transformers_reads_the_merged_tokenizer(sp_extended: dict[str, Any]) -> None:
    try:
        from sentencepiece import sentencepiece_model_pb2  # noqa: F401 - what transformers needs to convert
    except Exception as exc:  # noqa: BLE001 - protobuf's VersionError
        pytest.skip(f"transformers cannot read SentencePiece models in this environment: {str(exc)[:120]} "
                    "(sentencepiece's generated protobuf module is newer than the installed protobuf runtime)")
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(sp_extended["base"])
    merged = AutoTokenizer.from_pretrained(sp_extended["merged"])
    assert all(merged.get_vocab()[t] == i for t, i in base.get_vocab().items())
    assert merged.convert_tokens_to_ids(RESERVED) == BASE_PIECES
    assert merged.chat_template == base.chat_template
    text = corpus()[0]
    assert merged.decode(merged(text, add_special_tokens=False)["input_ids"]) == text


def test_resized_untied_model(sp_extended: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(sp_extended["tmp"] / "tiny_llama").eval()
    grown = AutoModelForCausalLM.from_pretrained(sp_extended["model"]).eval()
    report = json.loads((sp_extended["model"] / EXTENSION_FILE).read_text(encoding="utf-8"))
    assert report["resize"]["tied_embeddings"] is False
    ids = torch.randint(0, BASE_PIECES + 1, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(grown(ids).logits[..., :BASE_PIECES + 1], base(ids).logits, atol=1e-5)
    head_old, head_new = base.lm_head.weight, grown.lm_head.weight
    emb_old, emb_new = base.get_input_embeddings().weight, grown.get_input_embeddings().weight
    for tok in report["new_tokens"][::13]:
        assert torch.allclose(head_new[tok["id"]], head_old[tok["sub_token_ids"]].mean(0), atol=1e-6)
        assert torch.allclose(emb_new[tok["id"]], emb_old[tok["sub_token_ids"]].mean(0), atol=1e-6)
    assert (sp_extended["model"] / "tokenizer.model").is_file()


def test_sentencepiece_corpus_too_small(sp_extended: dict[str, Any], tmp_path: Path) -> None:
    cfg = load_config(ExtendConfig, ROOT / "config" / "tokenizer_config" / "extend.yaml",
                      [f"base_tokenizer={sp_extended['base']}", "train.vocab_size=60000",
                       f"train.output_dir={tmp_path / 'domain'}", "train.character_coverage=0.98"])
    with pytest.raises(UserError, match=r"corpus too small for train.vocab_size 60000: SentencePiece can make at "
                                        r"most \d+ pieces from 150 documents"):
        train_domain_tokenizer.main(cfg)
    assert not (tmp_path / "domain").exists()
