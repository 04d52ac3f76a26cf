"""Vocabulary extension of a byte-level BPE tokenizer (the tiny model's, built like Qwen2's) on the shipped sample
text: the three steps in-process, what the merge promises (old ids, unchanged encodings, reachable new tokens,
round trip), the resized model, continued pretraining that trains the new rows, and bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from self_model.core.config import load_config
from self_model.core.errors import UserError
from self_model.core.vocab_file import EXTENSION_FILE
from tokenizer import merge_tokenizer, resize_model, train_domain_tokenizer
from tokenizer.vocab.extend import ExtendConfig

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data_process" / "sample_data"


# Text from other domains; the ones holding none of the new tokens must encode exactly as before. (The tiny base
# saw little English, so its extension adds English pieces such as 'ti' or 'nd': most English text is excluded.)
UNRELATED = ["The weather is nice today, isn't it? 42 + 7 = 49.",
             "for (int i = 0; i < n; ++i) { sum += a[i]; }  // C++ loop",
             "😀🎉👍🏽 ½ → ∞ ≤ ≥ ± {[()]} += -= *= 0x1F 3.14159\n\n\t\r\n",
             "Москва — столица России, 2024 год.",
             "Καλημέρα κόσμε· 안녕하세요 세계. مرحبا بالعالم",
             "東京は日本の首都です。ひらがなとカタカナ。"]


def extend_config(tmp: Path, base: Path, **overrides: Any) -> ExtendConfig:
    values = {"base_tokenizer": base, "base_model": base, "train.output_dir": tmp / "domain",
              "merge.output_dir": tmp / "merged_tokenizer", "resize.output_dir": tmp / "merged_model", **overrides}
    return load_config(ExtendConfig, ROOT / "config" / "tokenizer_config" / "extend.yaml",
                       [f"{k}={v}" for k, v in values.items()])


def run_all(cfg: ExtendConfig) -> tuple[Path, Path, Path]:
    return train_domain_tokenizer.main(cfg), merge_tokenizer.main(cfg), resize_model.main(cfg)


def byte_form(text: str) -> str:
    from tokenizers import normalizers, pre_tokenizers

    text = normalizers.NFC().normalize_str(text)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)[0][0]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def extended(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cfg = extend_config(tmp_path_factory.mktemp("extend"), tiny_model_dir)
    domain, merged, model = run_all(cfg)
    report = json.loads((merged / EXTENSION_FILE).read_text(encoding="utf-8"))
    return {"cfg": cfg, "domain": domain, "merged": merged, "model": model, "report": report, "base": tiny_model_dir}


@pytest.fixture(scope="module")
def tokenizers_pair(extended: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(extended["base"]), AutoTokenizer.from_pretrained(extended["merged"])


def corpus() -> list[str]:
    return [ln for f in ("pretrain.txt", "pretrain_eval.txt")
            for ln in (SAMPLE / f).read_text(encoding="utf-8").splitlines() if ln.strip()]


def test_every_old_token_keeps_its_id(extended: dict[str, Any], tokenizers_pair: tuple[Any, Any]) -> None:
    base, merged = tokenizers_pair
    old, new = base.get_vocab(), merged.get_vocab()
    assert all(new[t] == i for t, i in old.items())
    added = [t["id"] for t in extended["report"]["new_tokens"]]
    assert added == list(range(len(base), len(merged))) and len(added) == extended["report"]["new_tokens_count"] > 100
    assert (merged.eos_token_id, merged.pad_token_id) == (base.eos_token_id, base.pad_token_id)
    assert merged.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == base.convert_tokens_to_ids(
        ["<|im_start|>", "<|im_end|>"])


def test_new_tokens_come_from_appended_merges(extended: dict[str, Any]) -> None:
    """Base merges first, unchanged and in order; each appended merge builds a new token; normal encoding of each
    new token's text yields exactly that token (not only as an added token: added_tokens is unchanged)."""
    from tokenizers import Tokenizer

    base = json.loads((extended["base"] / "tokenizer.json").read_text(encoding="utf-8"))
    merged = json.loads((extended["merged"] / "tokenizer.json").read_text(encoding="utf-8"))
    n_old = len(base["model"]["merges"])
    assert merged["model"]["merges"][:n_old] == base["model"]["merges"]
    assert merged["added_tokens"] == base["added_tokens"]
    vocab, first_new = merged["model"]["vocab"], len(base["model"]["vocab"])
    assert all(vocab["".join(m)] >= first_new for m in merged["model"]["merges"][n_old:])
    tok = Tokenizer.from_str(json.dumps(merged))
    for new in extended["report"]["new_tokens"]:
        assert [t.id for t in tok.model.tokenize(new["token"])] == [new["id"]], new


def test_round_trip_and_new_tokens_in_normal_encoding(extended: dict[str, Any],
                                                      tokenizers_pair: tuple[Any, Any]) -> None:
    base, merged = tokenizers_pair
    docs = corpus()
    ids = merged(docs, add_special_tokens=False)["input_ids"]
    assert all(merged.decode(x) == d for x, d in zip(ids, docs))
    first_new = len(base)
    used = {i for x in ids for i in x if i >= first_new}
    assert len(used) > 100
    old_count = sum(len(x) for x in base(docs, add_special_tokens=False)["input_ids"])
    assert sum(len(x) for x in ids) < old_count
    # The word list: a listed word the base lacked is one token of its own.
    word = "布洛芬"
    assert word not in {base.decode([i]) for i in range(len(base))}
    assert [merged.decode([i]) for i in merged(word, add_special_tokens=False)["input_ids"]] == [word]


def test_text_without_new_tokens_encodes_exactly_as_before(extended: dict[str, Any],
                                                         tokenizers_pair: tuple[Any, Any]) -> None:
    base, merged = tokenizers_pair
    new_forms = [t["token"] for t in extended["report"]["new_tokens"]]

    def clean(text: str) -> bool:
        form = byte_form(text)
        return not any(f in form for f in new_forms)

    lines = [d for d in corpus() if clean(d)]
    unrelated = [t for t in UNRELATED if clean(t)]
    assert len(unrelated) >= 3 and lines, "the check would be vacuous"
    for text in lines + unrelated:
        assert merged(text)["input_ids"] == base(text)["input_ids"], text
    # And text with a new word does change: the check can fail.
    assert merged("布洛芬")["input_ids"] != base("布洛芬")["input_ids"]


def test_report(extended: dict[str, Any]) -> None:
    report = extended["report"]
    assert report["kind"] == "byte_level_bpe" and report["old_ids_preserved"] is True
    assert report["vocab_after"] == report["vocab_before"] + report["new_tokens_count"]
    held = report["tokens_per_char"]["held_out"]
    assert held["documents"] == 20 and held["tokens_per_char_after"] <= held["tokens_per_char_before"]
    assert report["round_trip"]["equal_after"] == report["round_trip"]["documents"] == 170
    words = report["training"]["word_list"]
    assert "高血压" in words["already_in_base"]  # reported and skipped: the base has it
    assert [s["word"] for s in words["split_by_pre_tokenizer"]] == ["COVID-19"]
    assert report["unchanged"]["documents_equal"] == report["unchanged"]["documents_without_new_tokens"]


def test_resized_model(extended: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM

    base_w, new_w = weights(extended["base"]), weights(extended["model"])
    report = json.loads((extended["model"] / EXTENSION_FILE).read_text(encoding="utf-8"))
    emb_old, emb_new = base_w["model.embed_tokens.weight"], new_w["model.embed_tokens.weight"]
    assert emb_new.shape[0] == report["vocab_after"] and torch.equal(emb_new[:3000], emb_old)
    for tok in report["new_tokens"]:
        assert torch.allclose(emb_new[tok["id"]], emb_old[tok["sub_token_ids"]].mean(0), atol=1e-6), tok
    assert report["resize"]["tied_embeddings"] is True and report["resize"]["from_mean_of_all"] == 0
    base = AutoModelForCausalLM.from_pretrained(extended["base"]).eval()
    grown = AutoModelForCausalLM.from_pretrained(extended["model"]).eval()
    ids = torch.randint(0, 3000, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, after = base(ids).logits, grown(ids).logits
    assert after.shape[-1] == report["vocab_after"]
    assert torch.allclose(after[..., :3000], before, atol=1e-5)
    assert grown.get_output_embeddings().weight.data_ptr() == grown.get_input_embeddings().weight.data_ptr()


def test_untied_lm_head_rows(extended: dict[str, Any], tmp_path: Path) -> None:
    """A model with its own LM head: its new rows start at the mean of the sub-tokens' LM-head rows (and the rows are
    rounded up to a multiple of 64)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=3000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    untied = tmp_path / "untied"
    AutoModelForCausalLM.from_config(config).save_pretrained(untied)
    cfg = extend_config(tmp_path, extended["base"], **{"base_model": untied, "resize.pad_to_multiple_of": 64,
                                                       "train.output_dir": extended["cfg"].train.output_dir,
                                                       "merge.output_dir": extended["cfg"].merge.output_dir})
    out = resize_model.main(cfg)
    before, after = weights(untied), weights(out)
    head_old, head_new = before["lm_head.weight"], after["lm_head.weight"]
    report = json.loads((out / EXTENSION_FILE).read_text(encoding="utf-8"))
    assert report["resize"]["tied_embeddings"] is False
    for tok in report["new_tokens"][:50]:
        assert torch.allclose(head_new[tok["id"]], head_old[tok["sub_token_ids"]].mean(0), atol=1e-6)
    assert torch.equal(head_new[:3000], head_old)
    assert head_new.shape[0] == report["resize"]["rows_after"] == -(-report["vocab_after"] // 64) * 64


def test_cpt_on_the_merged_model_trains_the_new_rows(extended: dict[str, Any], pretrain_config: Any,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """LoRA continued pretraining: the new rows are in modules_to_save automatically, and they move."""
    train_pretrain = pytest.importorskip("self_model.pretrain.train_pretrain")
    cfg = pretrain_config({"model_name_or_path": str(extended["model"]),
                           "tokenizer_name_or_path": str(extended["merged"]), "peft.enabled": "true",
                           "peft.target_modules": "[q_proj, v_proj]", "training_args.learning_rate": "1.0e-2"})
    with caplog.at_level(logging.INFO, logger="self_model"):
        final = train_pretrain.main(cfg)
    n_new = extended["report"]["new_tokens_count"]
    assert f"the model holds {n_new} new rows added by tokenizer/resize_model.py" in caplog.text
    adapter = json.loads((final / "adapter_config.json").read_text(encoding="utf-8"))
    assert "embed_tokens" in adapter["modules_to_save"]
    trained = next(v for k, v in load_file(str(final / "adapter_model.safetensors")).items()
                   if k.endswith("embed_tokens.weight"))
    start = weights(extended["model"])["model.embed_tokens.weight"]
    used = sorted({t["id"] for t in extended["report"]["new_tokens"]})
    moved = (trained[used] - start[used]).abs().amax(dim=1) > 1e-4
    assert trained.shape == start.shape and moved.sum() > 0.3 * len(used)


# ---- bad input ------------------------------------------------------------------------------------------
def test_unsupported_tokenizer_kind_names_the_supported_ones(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "bert"
    folder.mkdir()
    wordpiece.save(str(folder / "tokenizer.json"))
    with pytest.raises(UserError) as err:
        train_domain_tokenizer.main(extend_config(tmp_path, tiny_model_dir, base_tokenizer=folder))
    message = str(err.value)
    assert "unsupported tokenizer: its tokenizer.json is a WordPiece model, not BPE" in message
    assert "byte_level_bpe: a tokenizer.json" in message and "sentencepiece: a SentencePiece model" in message
    assert not (tmp_path / "domain").exists() and not (tmp_path / "domain.tmp").exists()


def test_corpus_too_small_for_the_vocabulary(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = extend_config(tmp_path, tiny_model_dir, **{"train.vocab_size": 50000})
    with pytest.raises(UserError, match=r"corpus too small for train.vocab_size 50000: 150 documents .* yield only "
                                        r"\d+ tokens with train.min_frequency 2\. Set train.vocab_size: \d+"):
        train_domain_tokenizer.main(cfg)
    assert not (tmp_path / "domain").exists() and not (tmp_path / "domain.tmp").exists()


def test_model_and_tokenizer_that_do_not_match(extended: dict[str, Any], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config

    other = tmp_path / "other_model"
    AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=5000, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2,
                                                 num_key_value_heads=1)).save_pretrained(other)
    cfg = extend_config(tmp_path, extended["base"], **{"base_model": other,
                                                       "train.output_dir": extended["cfg"].train.output_dir,
                                                       "merge.output_dir": extended["cfg"].merge.output_dir})
    with pytest.raises(UserError, match="has 5000 embedding rows but the base tokenizer .* has 3000 tokens: they do "
                                        "not belong together"):
        resize_model.main(cfg)
    assert not (tmp_path / "merged_model").exists()


def test_candidates_of_another_base_are_refused(extended: dict[str, Any], tmp_path: Path) -> None:
    other = tmp_path / "other_tok"
    other.mkdir()
    data = json.loads((extended["base"] / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"] = data["model"]["merges"][:-1]
    (other / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    cfg = extend_config(tmp_path, extended["base"], **{"base_tokenizer": other,
                                                       "train.output_dir": extended["cfg"].train.output_dir})
    with pytest.raises(UserError, match="the domain tokenizer was trained against .* not against base_tokenizer"):
        merge_tokenizer.main(cfg)


def test_a_finished_output_is_never_overwritten(extended: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from self_model.core.cli import run_main

    before = (extended["merged"] / "tokenizer.json").stat().st_mtime_ns
    cfg = extended["cfg"]
    args = ["--config", str(ROOT / "config/tokenizer_config/extend.yaml"), f"base_tokenizer={extended['base']}",
            f"base_model={extended['base']}",
            f"train.output_dir={cfg.train.output_dir}", f"merge.output_dir={cfg.merge.output_dir}"]
    with pytest.raises(SystemExit) as exited:
        run_main(merge_tokenizer.main, ExtendConfig, "", args)
    assert exited.value.code == 1
    assert f"merge.output_dir: {cfg.merge.output_dir} already exists and is never overwritten by accident; pass " \
           "overwrite=true" in capsys.readouterr().err
    assert (extended["merged"] / "tokenizer.json").stat().st_mtime_ns == before


def test_readme_commands(embedded_model: str, tmp_path: Path) -> None:
    """The three README commands with the shipped YAML, as a user types them (outputs moved to a temp folder)."""
    from conftest import run_command

    outs = [f"train.output_dir={tmp_path / 'domain'}", f"merge.output_dir={tmp_path / 'merged_tokenizer'}",
            f"resize.output_dir={tmp_path / 'merged_model'}"]
    printed = []
    for script in ("train_domain_tokenizer.py", "merge_tokenizer.py", "resize_model.py"):
        result = run_command(["python", f"tokenizer/{script}", "--config", "config/tokenizer_config/extend.yaml",
                              *outs])
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        printed.append(result.stdout)
    assert "domain tokenizer (2400 tokens) saved to" in printed[0]
    assert "tokens per character, held-out text (1983 chars)" in printed[1] and "fewer tokens" in printed[1]
    assert f"resized model saved to {tmp_path / 'merged_model'}" in printed[2]
    assert (tmp_path / "merged_model" / "model.safetensors").is_file()
    again = run_command(["python", "tokenizer/merge_tokenizer.py", "--config", "config/tokenizer_config/extend.yaml",
                         *outs])
    assert again.returncode == 1 and "pass overwrite=true to replace it" in again.stderr


def test_shipped_yaml_loads_and_mistakes_are_reported_at_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    from self_model.core.errors import ConfigError

    cfg = extend_config(tmp_path, tiny_model_dir)
    assert (cfg.train.vocab_size, cfg.train.word_list, cfg.merge.output_dir) == (2400, "tokenizer/medical_terms.txt",
                                                                                 str(tmp_path / "merged_tokenizer"))
    with pytest.raises(ConfigError) as err:
        extend_config(tmp_path, tiny_model_dir, **{"train.vocab_sise": 10, "corpus.train_file": tmp_path / "no.txt",
                                                   "train.word_list": tmp_path / "words.txt",
                                                   "resize.pad_to_multiple_of": 0})
    problems = "\n".join(err.value.problems)
    assert "train.vocab_sise: unknown key (did you mean 'vocab_size'?)" in problems
    assert f"corpus.train_file: file not found: {tmp_path / 'no.txt'}" in problems
    assert f"train.word_list: file not found: {tmp_path / 'words.txt'}" in problems
    assert "resize.pad_to_multiple_of: must be a positive integer, got 0" in problems
