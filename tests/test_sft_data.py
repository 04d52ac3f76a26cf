"""SFT data: formats, bad rows with file:line, label masks of known samples, truncation, packing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from self_model.core.conversations import load_conversations
from self_model.core.errors import DataError, UserError
from self_model.fine_tuning.config import SFTDataConfig
from self_model.fine_tuning.data import (
    build_sft_dataset,
    keep_trained_hidden_states,
    make_collator,
    render_marked,
    tokenize_conversations,
)
from self_model.template.chat_template import IGNORE_INDEX, get_template

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data_process" / "sample_data"
QWEN = get_template("qwen2_chatml")


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["sft_train.jsonl", "sft_eval.jsonl", "sft_alpaca.jsonl", "sft_messages.jsonl"])
def test_shipped_samples_load(name: str) -> None:
    samples = load_conversations(str(SAMPLES / name))
    assert len(samples) >= 16
    assert all(s["messages"][-1]["role"] == "assistant" for s in samples)


def test_real_sharegpt_data_loads(shared_data: Path) -> None:
    samples = load_conversations(str(shared_data / "medical_sft_1K_format.jsonl"))
    assert len(samples) == 1000
    assert samples[0]["messages"][0]["role"] == "user" and samples[0]["messages"][1]["role"] == "assistant"


def test_three_formats_normalize_to_the_same_messages(tmp_path: Path) -> None:
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2\nmore"},
                {"role": "assistant", "content": "A2"}]
    rows = {
        "alpaca": {"system": "Be brief.", "history": [["Q1", "A1"]], "instruction": "Q2", "input": "more",
                   "output": "A2"},
        "sharegpt": {"system": "Be brief.", "conversations": [
            {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2\nmore"}, {"from": "gpt", "value": "A2"}]},
        "messages": {"messages": expected},
    }
    for name, row in rows.items():
        got = load_conversations(str(write_jsonl(tmp_path / f"{name}.jsonl", [row])))[0]["messages"]
        assert got == expected, name


@pytest.mark.parametrize("row,message", [
    ('{"conversations": [{"from": "human", "value": "hi"}', "malformed JSON"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "does not end with an assistant turn"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"},
                        {"from": "gpt", "value": "a"}]}, "'assistant' but a 'user' turn was expected"),
    ({"conversations": [{"from": "doctor", "value": "q"}, {"from": "gpt", "value": "a"}]}, "from='doctor'"),
    ({"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}, "role 'bot'"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}, "is empty"),
    ({"question": "q", "answer": "a"}, "unrecognised row"),
])
def test_bad_rows_are_named_with_file_and_line(tmp_path: Path, row: Any, message: str) -> None:
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    if "conversations" in str(row):  # one file holds one format: surround the bad row with its own kind
        good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = write_jsonl(tmp_path / "data.jsonl", [good, good, row])
    with pytest.raises(DataError) as exc:
        load_conversations(str(path))
    assert f"{path}:3: " in str(exc.value) and message in str(exc.value)


def test_mixed_formats_and_empty_file(tmp_path: Path) -> None:
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"instruction": "q", "output": "a"}])
    with pytest.raises(DataError, match="one file holds one format"):
        load_conversations(str(mixed))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        load_conversations(str(empty))
    with pytest.raises(UserError, match="data file not found"):
        load_conversations(str(tmp_path / "absent.jsonl"))


def test_all_bad_rows_counted(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", ["{oops"] * 25)
    with pytest.raises(DataError) as exc:
        load_conversations(str(path))
    assert "25 problem(s), first 10 shown" in str(exc.value)


def test_label_mask_trains_every_assistant_turn(tiny_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "发烧怎么办？"}, {"role": "assistant", "content": "多喝水，注意休息。"},
                {"role": "user", "content": "What else?"}, {"role": "assistant", "content": "See a doctor."}]
    ids, labels = QWEN.encode(tiny_tokenizer, messages)
    marked = render_marked(tiny_tokenizer, ids, labels)
    assert marked.count("[[") == 2
    assert "[[多喝水，注意休息。<|im_end|>]]" in marked and "[[See a doctor.<|im_end|>]]" in marked
    # Everything else, the system prompt and role headers included, is masked.
    assert marked.startswith("<|im_start|>system\nYou are Qwen")
    assert "<|im_start|>assistant\n[[" in marked
    # The official rendering, character for character.
    assert tiny_tokenizer.decode(ids) == QWEN.render(messages)


def test_mask_history_trains_only_the_last_turn(tiny_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    ids, labels = QWEN.encode(tiny_tokenizer, messages, mask_history=True)
    assert render_marked(tiny_tokenizer, ids, labels).count("[[") == 1
    assert tiny_tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == "a2<|im_end|>"


def test_truncation_is_reported_and_drop_policy(tiny_tokenizer: Any) -> None:
    long = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "很长的回答。" * 40}]}
    short = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ok"}]}
    prompt_only = {"messages": [{"role": "user", "content": "问题" * 60}, {"role": "assistant", "content": "ok"}]}
    data = SFTDataConfig(train_file="x", max_length=48)
    rows, report = tokenize_conversations([long, short, prompt_only], tiny_tokenizer, QWEN, data)
    assert report.truncated == 2 and report.dropped_no_target == 1 and len(rows) == 2
    assert max(len(r["input_ids"]) for r in rows) == 48
    rows, report = tokenize_conversations([long, short], tiny_tokenizer, QWEN,
                                          SFTDataConfig(train_file="x", max_length=48, truncation="drop"))
    assert report.dropped_too_long == 1 and len(rows) == 1


def test_tokenizer_without_template_tokens_is_refused(tiny_tokenizer: Any) -> None:
    from self_model.core.errors import UserError

    class Plain:
        def get_vocab(self) -> dict[str, int]:
            return {"a": 0}

    with pytest.raises(UserError, match=r"lacks the special tokens \['<\|im_start\|>', '<\|im_end\|>'"):
        QWEN.check_tokenizer(Plain())
    QWEN.check_tokenizer(tiny_tokenizer)  # a tokenizer with the template's tokens passes


@pytest.mark.parametrize("attention", ["sdpa", "sdpa_varlen"])
def test_packed_and_unpacked_logits_agree(tiny_model_dir: Path, tiny_tokenizer: Any, attention: str) -> None:
    """Padding-free packing keeps samples apart: each sample's logits equal those of an unpacked run, both
    with SDPA's block-diagonal mask and with per-document attention (what packed training uses)."""
    from transformers import AutoModelForCausalLM

    from self_model.core.attention import restore_sdpa, use_varlen_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.config.use_cache = False
    data = SFTDataConfig(train_file=str(SAMPLES / "sft_train.jsonl"), max_length=256)
    dataset, _ = build_sft_dataset(data.train_file, tiny_tokenizer, QWEN, data, limit=3)
    features = [dataset[i] for i in range(3)]
    packed = make_collator(tiny_tokenizer, packing=True)(features)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["cu_seq_lens_q"].tolist()[-1] == packed["input_ids"].shape[1]
    padded = make_collator(tiny_tokenizer, packing=False)(features)
    with torch.no_grad():
        padded_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        if attention == "sdpa_varlen":
            assert use_varlen_attention(model)
        packed_logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0]
        restore_sdpa(model)
        assert model.config._attn_implementation == "sdpa"
    start = 0
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        torch.testing.assert_close(packed_logits[start:start + n], padded_logits[i, :n], atol=1e-4, rtol=1e-4)
        # No sample learns to predict the next one: the first label of each packed sample is masked.
        assert packed["labels"][0, start].item() == IGNORE_INDEX
        start += n
    # And the comparison is not vacuous: attending across samples would change the second sample's logits.
    with torch.no_grad():
        leaky = model(input_ids=packed["input_ids"]).logits[0]
    n0 = len(features[0]["input_ids"])
    assert not torch.allclose(leaky[n0:n0 + 5], packed_logits[n0:n0 + 5], atol=1e-3)


def test_parallel_tokenization_matches_serial(tiny_tokenizer: Any) -> None:
    serial_cfg = SFTDataConfig(train_file=str(SAMPLES / "sft_train.jsonl"), max_length=64)
    parallel_cfg = SFTDataConfig(train_file=str(SAMPLES / "sft_train.jsonl"), max_length=64, num_proc=2)
    serial, serial_report = build_sft_dataset(serial_cfg.train_file, tiny_tokenizer, QWEN, serial_cfg)
    parallel, parallel_report = build_sft_dataset(parallel_cfg.train_file, tiny_tokenizer, QWEN, parallel_cfg)
    assert serial["input_ids"] == parallel["input_ids"] and serial["labels"] == parallel["labels"]
    assert serial_report.summary() == parallel_report.summary() and serial_report.truncated > 0


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("packing", [False, True])
def test_trained_logits_only_gives_the_same_loss_and_gradients(tiny_model_dir: Path, tiny_tokenizer: Any,
                                                               packing: bool, lora: bool) -> None:
    """Computing the LM head only at trained positions changes the cost, not the loss or its gradient; and the
    head really sees only the trained positions (a padded batch included, where whole columns would be ~4x)."""
    from transformers import AutoModelForCausalLM

    from self_model.core.modeling import apply_peft
    from self_model.core.stage_config import PeftConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.use_cache = False
    if lora:
        lora_config = PeftConfig(enabled=True, lora_r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        model = apply_peft(model, lora_config)
    data = SFTDataConfig(train_file=str(SAMPLES / "sft_train.jsonl"), max_length=256)
    dataset, _ = build_sft_dataset(data.train_file, tiny_tokenizer, QWEN, data, limit=4)
    features = [dataset[i] for i in range(4)]
    full = make_collator(tiny_tokenizer, packing)(features)
    assert keep_trained_hidden_states(model)  # what build_sft_trainer does before choosing the collator
    lean = make_collator(tiny_tokenizer, packing, trained_logits_only=True)(features)
    n_trained = int((full["labels"] != IGNORE_INDEX).sum())
    assert int((lean["shift_labels"] != IGNORE_INDEX).sum()) == n_trained
    base = model.get_base_model() if lora else model
    head_positions: list[int] = []
    watch = base.lm_head.register_forward_hook(lambda m, args, out: head_positions.append(out.shape[:-1].numel()))
    query = base.model.layers[0].self_attn.q_proj
    query_weight = query.lora_B["default"].weight if lora else query.weight

    def loss_and_grad(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        out = model(**batch, num_items_in_batch=torch.tensor(n_trained))
        out.loss.backward()
        return out.loss.detach(), query_weight.grad.clone()

    loss_full, grad_full = loss_and_grad(full)
    loss_lean, grad_lean = loss_and_grad(lean)
    watch.remove()
    assert head_positions == [full["input_ids"].numel(), n_trained]
    torch.testing.assert_close(loss_lean, loss_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_lean, grad_full, atol=1e-6, rtol=1e-4)
    # The mask was consumed: a plain call (generation, an eval without it) computes every position again.
    with torch.no_grad():
        assert model(input_ids=full["input_ids"]).logits.shape[:2] == full["input_ids"].shape
