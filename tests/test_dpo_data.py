"""DPO config and preference data: strict rlhf.yaml, loss types from the installed trl, four formats, ids equal to
SFT's, and every kind of bad row named with file:line."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from self_model.core.config import load_config
from self_model.core.errors import ConfigError, DataError
from self_model.core.preferences import load_preference_pairs
from self_model.rlhf.config import DPODataConfig, DPOStageConfig, dpo_loss_types
from self_model.rlhf.dpo.data import build_preference_dataset, encode_pair
from self_model.template.chat_template import IGNORE_INDEX, get_template

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data_process" / "sample_data"
RLHF_YAML = ROOT / "config" / "self_model_config" / "rlhf.yaml"
QWEN = get_template("qwen2_chatml")


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def rlhf_data(tiny_model_dir: Path, **changes: Any) -> dict[str, Any]:
    """The shipped rlhf.yaml pointed at the tiny model (the SFT adapter it names may not exist here)."""
    data = yaml.safe_load(RLHF_YAML.read_text(encoding="utf-8"))
    data.update(model_name_or_path=str(tiny_model_dir), tokenizer_name_or_path=str(tiny_model_dir))
    data.pop("adapter_name_or_path")
    data = copy.deepcopy(data)
    for key, value in changes.items():
        data[key] = value
    return data


def problems(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    return "\n".join(exc.value.problems)


# ---- config ----------------------------------------------------------------------------------------------
def test_shipped_rlhf_yaml_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(DPOStageConfig, None, data=rlhf_data(tiny_model_dir))
    assert cfg.loss_type == "sigmoid" and cfg.beta == 0.1 and cfg.peft.enabled
    assert cfg.data.train_file.endswith("dpo_train.jsonl") and cfg.training_args["output_dir"].endswith("rlhf/dpo")
    assert cfg.ppo is not None
    # The shipped file names the SFT result of the README's first command.
    shipped = yaml.safe_load(RLHF_YAML.read_text(encoding="utf-8"))
    assert shipped["adapter_name_or_path"] == "self_model/checkpoints/finetune/final"
    # An adapter folder holding a tokenizer is used for the tokenizer when none is named.
    adapter = tmp_path / "sft"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "tokenizer_config.json").write_text("{}")
    data = rlhf_data(tiny_model_dir, adapter_name_or_path=str(adapter))
    data.pop("tokenizer_name_or_path")
    assert load_config(DPOStageConfig, None, data=data).tokenizer_path == str(adapter)


def test_loss_types_come_from_the_installed_trl(tiny_model_dir: Path) -> None:
    from trl import DPOConfig

    valid = dpo_loss_types()
    documented = set(re.findall(r"'(\w+)'", DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]))
    assert set(valid) == documented and "sigmoid" in valid and "ipo" in valid
    for name in valid:
        assert load_config(DPOStageConfig, None, data=rlhf_data(tiny_model_dir, loss_type=name)).loss_type == name
    with pytest.raises(ConfigError) as exc:
        load_config(DPOStageConfig, None, data=rlhf_data(tiny_model_dir, loss_type="sigmod"))
    text = problems(exc)
    assert "loss_type: unknown loss type 'sigmod' (did you mean 'sigmoid'?)" in text
    assert all(name in text for name in valid)
    with pytest.raises(ConfigError, match=r"loss_type\[1\]|unknown loss type 'dpo'"):
        load_config(DPOStageConfig, None, data=rlhf_data(tiny_model_dir, loss_type=["sigmoid", "dpo"]))


def test_training_args_are_checked_against_every_dpo_config_field() -> None:
    """DPOConfig's fields are read from source through its bases (trl's _BaseConfig, transformers' re-export of
    TrainingArguments): exactly the fields the real class accepts."""
    import dataclasses

    from trl import DPOConfig

    from self_model.core.backend_args import backend_fields
    from self_model.rlhf.config import DPO_CONFIG

    assert set(backend_fields(DPO_CONFIG)) == {f.name for f in dataclasses.fields(DPOConfig) if f.init}


def test_every_mistake_at_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    not_adapter = tmp_path / "merged"
    not_adapter.mkdir()
    data = rlhf_data(tiny_model_dir, beta=-1, adapter_name_or_path=str(not_adapter), ppo={"rollouts": 4})
    data["data"]["max_lenght"] = 10
    data["training_args"].update(beta=0.2, max_prompt_length=128, learning_rat=1.0, max_length=64,
                                 evaluation_strategy="steps")
    with pytest.raises(ConfigError) as exc:
        load_config(DPOStageConfig, None, data=data)
    text = problems(exc)
    assert "data.max_lenght: unknown key (did you mean 'max_length'?)" in text
    assert "training_args.beta: set by this toolkit; use the top-level beta: instead" in text
    assert "training_args.max_length: set by this toolkit; use data.max_length instead" in text
    assert "training_args.max_prompt_length: not an argument of DPOConfig any more" in text
    assert "training_args.learning_rat: unknown DPOConfig argument (did you mean 'learning_rate'?)" in text
    assert "training_args.evaluation_strategy: not an argument of DPOConfig any more; use eval_strategy" in text
    assert f"adapter_name_or_path: {not_adapter} holds no adapter_config.json" in text
    assert "ppo.rollouts: unknown key" in text
    # beta is a cross-field check, reported once the sections themselves are valid.
    with pytest.raises(ConfigError, match="beta: expected a positive number"):
        load_config(DPOStageConfig, None, data=rlhf_data(tiny_model_dir, beta=0))


def test_ppo_section_may_be_empty_or_absent(tiny_model_dir: Path) -> None:
    for value in ({}, None):
        load_config(DPOStageConfig, None, data=rlhf_data(tiny_model_dir, ppo=value))
    data = rlhf_data(tiny_model_dir)
    data.pop("ppo")
    load_config(DPOStageConfig, None, data=data)


def test_missing_sft_adapter_says_how_to_make_one(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="train_finetune.py"):
        load_config(DPOStageConfig, None, data=rlhf_data(tiny_model_dir, adapter_name_or_path="runs/sft/final"))


# ---- formats ---------------------------------------------------------------------------------------------
def test_four_formats_give_the_same_pair(tmp_path: Path) -> None:
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
              {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    good, bad = {"role": "assistant", "content": "yes"}, {"role": "assistant", "content": "no"}
    rows = {
        "sharegpt": {"system": "Be brief.", "conversations": [
            {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"}],
            "chosen": "yes", "rejected": "no"},
        "sharegpt turn objects": {"system": "Be brief.", "conversations": [
            {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"}],
            "chosen": {"from": "gpt", "value": "yes"}, "rejected": {"from": "gpt", "value": "no"}},
        "messages": {"messages": prompt, "chosen": good, "rejected": bad},
        "prompt with message lists": {"prompt": prompt, "chosen": [good], "rejected": [bad]},
        "implicit": {"chosen": prompt + [good], "rejected": prompt + [bad]},
    }
    for i, (name, row) in enumerate(rows.items()):
        pairs, _ = load_preference_pairs(str(write_jsonl(tmp_path / f"{i}.jsonl", [row])))
        assert (pairs[0]["prompt"], pairs[0]["chosen"], pairs[0]["rejected"]) == (prompt, good, bad), name
    pairs, _ = load_preference_pairs(str(write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Q2", "system": "Be brief.", "chosen": "yes", "rejected": "no"}])))
    assert pairs[0]["prompt"] == [prompt[0], prompt[3]] and pairs[0]["format"] == "prompt"


def test_ids_equal_the_sft_rendering(tiny_tokenizer: Any) -> None:
    """prompt + chosen tokenize exactly as SFT tokenizes the same conversation; the reply ends on <|im_end|>."""
    pairs, _ = load_preference_pairs(str(SAMPLES / "dpo_train.jsonl"))
    for pair in pairs[:5]:
        prompt_ids, chosen_ids, rejected_ids = encode_pair(tiny_tokenizer, QWEN, pair)
        for reply, reply_ids in ((pair["chosen"], chosen_ids), (pair["rejected"], rejected_ids)):
            ids, labels = QWEN.encode(tiny_tokenizer, pair["prompt"] + [reply], mask_history=False)
            assert prompt_ids + reply_ids == ids[: len(prompt_ids) + len(reply_ids)]
            assert reply_ids == [label for label in labels if label != IGNORE_INDEX]
            assert tiny_tokenizer.decode(reply_ids) == reply["content"] + "<|im_end|>"
        # The prompt is what the model is asked at inference (the generation prompt included).
        assert prompt_ids == QWEN.prompt_ids(tiny_tokenizer, pair["prompt"])
        assert tiny_tokenizer.decode(prompt_ids).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_real_medicalgpt_preference_data(shared_data: Path, tiny_tokenizer: Any) -> None:
    data = DPODataConfig(train_file=str(shared_data / "dpo_zh_500.jsonl"), max_length=256)
    dataset, report = build_preference_dataset(data.train_file, tiny_tokenizer, QWEN, data)
    summary = report.summary()
    assert summary["rows_in"] == 500 and summary["identical_dropped"] == 0
    assert len(dataset) == summary["pairs_out"] == 500 - summary["dropped_prompt_fills_max_length"]
    assert summary["truncated"] > 0  # long answers are cut at 256 tokens, and counted
    assert max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in dataset) <= 256


# ---- bad input -------------------------------------------------------------------------------------------
GOOD = {"conversations": [{"from": "human", "value": "头疼怎么办？"}], "chosen": "多休息。", "rejected": "不知道。"}
GOOD_PROMPT = {"prompt": "头疼怎么办？", "chosen": "多休息。", "rejected": "不知道。"}


@pytest.mark.parametrize("row,message", [
    ({"conversations": GOOD["conversations"], "rejected": "x"}, "no 'chosen' (the preferred reply)"),
    ({"conversations": GOOD["conversations"], "chosen": "x"}, "no 'rejected' (the dispreferred reply)"),
    ({"conversations": [{"from": "human", "value": "  "}], "chosen": "a", "rejected": "b"}, "the prompt is empty"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "the prompt is empty"),
    ({"prompt": [{"role": "system", "content": "s"}], "chosen": "a", "rejected": "b"}, "prompt is empty: it has no"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": "q", "chosen": {"from": "human", "value": "a"}, "rejected": "b"}, "'chosen' is a 'user' turn"),
    ({"prompt": "q", "chosen": ["a", "b"], "rejected": "b"}, "'chosen' is a list of 2 messages"),
    ({"question": "q", "answer": "a"}, "unrecognised preference row"),
    ('{"prompt": "q", ', "malformed JSON"),
])
def test_bad_rows_name_file_and_line(tmp_path: Path, row: Any, message: str) -> None:
    first = GOOD_PROMPT if isinstance(row, dict) and "prompt" in row else GOOD  # one file holds one format
    path = write_jsonl(tmp_path / "pairs.jsonl", [first, row])
    with pytest.raises(DataError) as exc:
        load_preference_pairs(str(path))
    assert f"{path}:2: " in str(exc.value) and message in str(exc.value), str(exc.value)


def test_identical_pairs_are_counted_and_refused_or_dropped(tmp_path: Path, tiny_tokenizer: Any) -> None:
    same = dict(GOOD, rejected=GOOD["chosen"])
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, same, GOOD, same])
    with pytest.raises(DataError) as exc:
        load_preference_pairs(str(path))
    assert "2 pair(s) have identical chosen and rejected" in str(exc.value)
    assert f"{path}:2, {path}:4" in str(exc.value) and "data.drop_identical: true" in str(exc.value)
    data = DPODataConfig(train_file=str(path), drop_identical=True)
    dataset, report = build_preference_dataset(str(path), tiny_tokenizer, QWEN, data)
    assert len(dataset) == 2 and report.summary()["identical_dropped"] == 2 and report.summary()["rows_in"] == 4


def test_long_pairs_follow_the_truncation_policy(tmp_path: Path, tiny_tokenizer: Any) -> None:
    long_row = dict(GOOD, chosen="多休息，多喝水。" * 40)
    huge_prompt = dict(GOOD, conversations=[{"from": "human", "value": "头疼怎么办？" * 80}])
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, long_row, huge_prompt])
    data = DPODataConfig(train_file=str(path), max_length=64)
    dataset, report = build_preference_dataset(str(path), tiny_tokenizer, QWEN, data)
    summary = report.summary()
    assert (summary["truncated"], summary["dropped_prompt_fills_max_length"], len(dataset)) == (1, 1, 2)
    assert len(dataset[1]["prompt_ids"]) + len(dataset[1]["chosen_ids"]) == 64
    data = DPODataConfig(train_file=str(path), max_length=64, truncation="drop")
    dataset, report = build_preference_dataset(str(path), tiny_tokenizer, QWEN, data)
    assert (report.summary()["dropped_too_long"], report.summary()["truncated"], len(dataset)) == (1, 0, 1)


def test_a_file_holds_one_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, GOOD_PROMPT])
    with pytest.raises(DataError, match=r"pairs.jsonl:2: row is 'prompt' but .*pairs.jsonl:1 is 'sharegpt'"):
        load_preference_pairs(str(path))


def test_tool_definitions_reach_the_prompt(tmp_path: Path, tiny_tokenizer: Any) -> None:
    tools = [{"type": "function", "function": {"name": "lookup_drug", "description": "look a drug up",
                                               "parameters": {"type": "object", "properties": {}}}}]
    row = {"messages": [{"role": "user", "content": "布洛芬是什么？"}], "tools": tools, "chosen": "a", "rejected": "b"}
    pairs, _ = load_preference_pairs(str(write_jsonl(tmp_path / "pairs.jsonl", [row])))
    prompt_ids, _, _ = encode_pair(tiny_tokenizer, QWEN, pairs[0])
    assert "<tools>" in tiny_tokenizer.decode(prompt_ids) and "lookup_drug" in tiny_tokenizer.decode(prompt_ids)


def test_a_tool_call_reply_keeps_its_call(tmp_path: Path) -> None:
    """A preferred reply that is a tool call (LLaMA-Factory's function_call turn, or OpenAI tool_calls) stays one."""
    rows = [{"conversations": [{"from": "human", "value": "北京天气？"}],
             "chosen": {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "北京"}}'},
             "rejected": {"from": "gpt", "value": "不知道。"}},
            {"conversations": [{"from": "human", "value": "上海天气？"}],
             "chosen": {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "上海"}'}}]},
             "rejected": {"from": "gpt", "value": "不知道。"}}]
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    pairs, _ = load_preference_pairs(str(path))
    calls = [p["chosen"]["tool_calls"][0]["function"] for p in pairs]
    assert calls == [{"name": "get_weather", "arguments": {"city": "北京"}},
                     {"name": "get_weather", "arguments": {"city": "上海"}}]
