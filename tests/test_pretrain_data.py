"""Continued-pretraining data: files, documents, blocks, the cache, streaming, bad input, vocabulary growth."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from self_model.core.config import load_config
from self_model.core.errors import ConfigError, DataError, UserError
from self_model.core.stage_config import PeftConfig
from self_model.pretrain.config import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data_process" / "sample_data"


def _blocks(cfg: PretrainConfig, tokenizer: Any) -> tuple[list[dict[str, Any]], Any]:
    from self_model.pretrain.data import load_blocks

    ds, report = load_blocks(cfg.data.train_file, tokenizer, cfg, "train", cfg.data.streaming)
    return [dict(row) for row in ds], report


def test_shipped_pretrain_yaml_loads(pretrain_config: Any) -> None:
    cfg = pretrain_config()
    assert cfg.objective == "clm" and cfg.data.block_size == 128 and cfg.data.text_fields == ["text"]
    assert cfg.training_args["output_dir"].endswith("run")


def test_every_mistake_at_once(pretrain_yaml: dict[str, Any], tiny_model_dir: Path, tmp_path: Path) -> None:
    data = copy.deepcopy(pretrain_yaml)
    data.update(model_name_or_path=str(tiny_model_dir), template="qwen2_chatml", mlm_probability=1.5)
    data["data"].update(train_file=str(tmp_path / "nothing" / "*.txt"), block_sise=64, streaming=True,
                        eval_file=str(SAMPLE / "sft_train.jsonl").replace(".jsonl", ".csv"))
    data["training_args"]["deepspeed"] = "no_such_ds.json"
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, None, data=data)
    text = str(err.value)
    assert f"data.train_file: no file matches the glob: {tmp_path}/nothing/*.txt" in text
    assert "data.block_sise: unknown key (did you mean 'block_size'?)" in text
    assert "data.eval_file: file not found" in text
    # Cross-field checks run once the sections themselves are valid.
    data["data"].pop("block_sise")
    data["data"]["train_file"] = str(SAMPLE / "pretrain.txt")
    data["data"]["eval_file"] = str(SAMPLE)  # a folder: every .txt / .jsonl inside
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, None, data=data)
    text = str(err.value)
    assert "template / template_path: continued pretraining trains plain text" in text
    assert "mlm_probability: expected a number between 0 and 1, got 1.5" in text
    assert "data.streaming: true needs training_args.max_steps" in text
    assert "training_args.deepspeed: file not found: no_such_ds.json" in text


def test_files_folders_globs_and_text_fields(tmp_path: Path) -> None:
    from self_model.core.corpus import CorpusStats, iter_documents, resolve_corpus

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first line\n\n second  \n", encoding="utf-8")
    rows = [{"title": "T", "body": "B", "other": 1}, {"body": "only body"},
            {"messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "a."}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    (tmp_path / "sub" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    (tmp_path / "sub" / "notes.md").write_text("ignored: not a corpus file type")
    files = resolve_corpus(str(tmp_path))
    assert [f.name for f in files] == ["a.txt", "b.jsonl"]
    assert resolve_corpus([str(tmp_path / "sub" / "*.jsonl"), str(tmp_path / "sub" / "b.jsonl")]) == files[1:]
    stats = CorpusStats()
    docs = list(iter_documents(files, ["title", "body"], stats))
    assert docs == ["first line", " second  ", "T\nB", "only body", "q?\na.", "hi\nhello"]
    assert stats.documents == 6 and not stats.problems


def test_bad_input_is_named_by_file_line_and_offset(tmp_path: Path) -> None:
    from self_model.core.corpus import CorpusStats, iter_documents

    bad = tmp_path / "bad.txt"
    bad.write_bytes("好的一行\n".encode() + b"broken \xff\xfe here\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"title": "no text field"}\n{not json}\n{"text": 3}\n', encoding="utf-8")
    stats = CorpusStats()
    list(iter_documents([bad, empty, rows], ["text"], stats))
    with pytest.raises(DataError) as err:
        stats.raise_if_bad("train data")
    text = str(err.value)
    offset = len("好的一行\n".encode()) + len(b"broken ")
    assert f"{bad}:2: byte offset {offset}: not valid UTF-8 (bytes ff fe 20 68)" in text
    assert f"{empty}: the file is empty (no text)" in text
    assert f"{rows}:2: none of the text_fields ['text'] is present (keys: ['title'])" in text
    assert f"{rows}:3: malformed JSON" in text
    assert f"{rows}:4: field 'text' must be a string, got int" in text
    assert "5 problem(s)" in text


def test_blocks_join_documents_with_eos_and_report_remainders(pretrain_config: Any, tiny_tokenizer: Any,
                                                              tmp_path: Path) -> None:
    corpus = tmp_path / "docs.txt"
    docs = ["发热是常见症状。", "高血压需要长期管理。", "Drink water and rest."] * 7
    corpus.write_text("\n".join(docs) + "\n", encoding="utf-8")
    eos = tiny_tokenizer.eos_token_id
    stream = [t for d in docs for t in tiny_tokenizer(d)["input_ids"] + [eos]]
    cfg = pretrain_config({"data.train_file": str(corpus), "data.block_size": "16", "data.remainder": "drop"})
    blocks, report = _blocks(cfg, tiny_tokenizer)
    assert [b["input_ids"] for b in blocks] == [stream[i:i + 16] for i in range(0, len(stream) - 15, 16)]
    assert all(b["labels"] == b["input_ids"] and b["attention_mask"] == [1] * 16 for b in blocks)
    assert report.tokens == len(stream) and report.dropped_tokens == len(stream) % 16 > 0
    # The end of a document is learned although pad == eos here: neither the blocks nor the collator hide it.
    from self_model.pretrain.trainer import pretrain_collator

    batch = pretrain_collator(tiny_tokenizer, cfg)(blocks[:2])
    assert tiny_tokenizer.pad_token_id == eos and (batch["labels"] == eos).any()
    assert batch["labels"].tolist() == [b["input_ids"] for b in blocks[:2]]

    cfg = pretrain_config({"data.train_file": str(corpus), "data.block_size": "16", "data.remainder": "pad"})
    blocks, report = _blocks(cfg, tiny_tokenizer)
    rest = len(stream) % 16
    last = blocks[-1]
    assert last["input_ids"][:rest] == stream[-rest:] and last["attention_mask"] == [1] * rest + [0] * (16 - rest)
    assert last["labels"] == stream[-rest:] + [-100] * (16 - rest)
    assert report.padded_blocks == 1 and report.padding_tokens == 16 - rest and report.dropped_tokens == 0


def test_tokenized_once_then_cached_and_invalidated_by_a_changed_file(pretrain_config: Any, tiny_tokenizer: Any,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    corpus = tmp_path / "c.txt"
    corpus.write_text((SAMPLE / "pretrain.txt").read_text(encoding="utf-8"), encoding="utf-8")
    cfg = pretrain_config({"data.train_file": str(corpus)})
    calls: list[str] = []
    real_map = datasets.Dataset.map

    def counting_map(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("desc", ""))
        return real_map(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", counting_map)
    first, report = _blocks(cfg, tiny_tokenizer)
    assert len(calls) == 2 and not report.from_cache
    second, report2 = _blocks(cfg, tiny_tokenizer)
    assert len(calls) == 2, "the second run tokenized again"
    assert report2.from_cache and second == first and report2.blocks == len(first)
    assert len(list(Path(cfg.data.cache_dir).iterdir())) == 1  # no work folders left behind
    stamp = corpus.stat().st_mtime_ns
    os.utime(corpus, ns=(stamp + 10**9, stamp + 10**9))
    _blocks(cfg, tiny_tokenizer)
    assert len(calls) == 4, "a changed file must be tokenized again"


def test_parallel_and_streaming_give_the_same_blocks(pretrain_config: Any, tiny_tokenizer: Any,
                                                     tmp_path: Path) -> None:
    serial, _ = _blocks(pretrain_config({"data.block_size": "64"}), tiny_tokenizer)
    parallel, report = _blocks(pretrain_config({"data.block_size": "64", "data.num_proc": "2",
                                                "data.cache_dir": str(tmp_path / "other")}), tiny_tokenizer)
    assert not report.from_cache
    streamed, sreport = _blocks(pretrain_config({"data.block_size": "64", "data.streaming": "true"}), tiny_tokenizer)
    assert serial == parallel and len(serial) == report.blocks > 50
    assert streamed == serial and sreport.streaming


def test_corpus_smaller_than_one_block_and_block_longer_than_context(pretrain_config: Any, tiny_tokenizer: Any,
                                                                     tmp_path: Path) -> None:
    from self_model.pretrain.trainer import check_block_size

    small = tmp_path / "small.txt"
    small.write_text("发热怎么办？\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"small.txt: the train corpus has \d+ tokens, fewer than one block "
                                        r"\(data.block_size: 128\)"):
        _blocks(pretrain_config({"data.train_file": str(small)}), tiny_tokenizer)
    with pytest.raises(DataError, match="yields no full block"):
        _blocks(pretrain_config({"data.train_file": str(small), "data.streaming": "true"}), tiny_tokenizer)
    with pytest.raises(ConfigError, match=r"data.block_size: 4096 is longer than the model's context "
                                          r"\(max_position_embeddings: 2048\)"):
        check_block_size(pretrain_config({"data.block_size": "4096"}))


def test_streaming_bad_row_raises_with_its_line(pretrain_config: Any, tiny_tokenizer: Any, tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"content": "wrong field"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"rows.jsonl:2: none of the text_fields \['text'\] is present"):
        _blocks(pretrain_config({"data.train_file": str(rows), "data.streaming": "true"}), tiny_tokenizer)


def test_vocabulary_growth_uses_the_mean_and_smaller_tokenizers_are_refused(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from self_model.pretrain.trainer import match_vocabulary

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens([f"新词{i}" for i in range(40)])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    old = model.get_input_embeddings().weight.detach().clone()
    peft = match_vocabulary(model, tok, PeftConfig(enabled=True, target_modules=["q_proj"]))
    grown = model.get_input_embeddings().weight.detach()
    assert grown.shape == (len(tok), old.shape[1]) and torch.equal(grown[: old.shape[0]], old)
    assert torch.allclose(grown[old.shape[0]:], old.mean(0).expand(40, -1), atol=1e-4)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert peft.modules_to_save == ["embed_tokens", "lm_head"]
    assert match_vocabulary(model, tok, PeftConfig()).modules_to_save is None  # full training: nothing to add

    small = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(4000)
    with pytest.raises(UserError, match="4000 embedding rows but the tokenizer only 3000 tokens"):
        match_vocabulary(model, small, PeftConfig())
    model.resize_token_embeddings(3008)  # rows padded to a multiple of 64 (as Qwen2.5 does): accepted
    assert match_vocabulary(model, small, PeftConfig()).modules_to_save is None


@pytest.mark.parametrize("name,stage,offload", [("ds_zero2.json", 2, False), ("ds_zero3.json", 3, False),
                                                ("ds_zero3_offload.json", 3, True)])
def test_shipped_deepspeed_configs(name: str, stage: int, offload: bool) -> None:
    """Batch sizes, precision and clipping are `auto` (filled from training_args by transformers)."""
    ds = json.loads((ROOT / "config" / "self_model_config" / "deepspeed" / name).read_text())
    assert ds["zero_optimization"]["stage"] == stage
    assert ("offload_optimizer" in ds["zero_optimization"]) == offload
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert ds[key] == "auto", key
    assert ds["bf16"]["enabled"] == ds["fp16"]["enabled"] == "auto"
