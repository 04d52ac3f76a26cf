"""process_data.py agrees with training: it reads every row the trainers read (tools and tool calls kept), refuses
the others with the trainers' messages, and its default cleaning keeps Chinese punctuation (issue 15, items 8, 9)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from data_process.dataproc.clean import clean_text
from data_process.dataproc.options import ProcessConfig, load_process_config
from data_process.dataproc.pipeline import run
from self_model.core.config import load_config
from self_model.core.conversations import load_conversations
from self_model.core.errors import DataError
from self_model.core.preferences import load_preference_pairs
from self_model.core.prompt_rows import load_prompts

ROOT = Path(__file__).resolve().parents[1]
TOOLS = [{"name": "get_weather", "description": "查询城市天气（ＡＰＩ）",  # full-width: cleaning would fold it
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
CALL = {"name": "get_weather", "arguments": {"city": "北京"}}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def process(tmp_path: Path, inputs: list[Path], **options: Any) -> tuple[dict[str, Any], Path]:
    data = {"input": [str(p) for p in inputs], "output_dir": str(tmp_path / "out"), "subdir": "s", "num_proc": 1,
            "val_ratio": 0.0, "min_chars": 1, **options}
    cfg = load_config(ProcessConfig, None, data=data)
    return run(cfg), cfg.out_dir


def out_rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]


def trained(samples: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """What a trainer uses of its loaded rows (not where they came from)."""
    return [{key: s.get(key) for key in keys} for s in samples]


# --- item 8: the same readers as the trainers -----------------------------------------------------------------


def test_sharegpt_and_messages_tool_rows_keep_tools_and_calls(tmp_path: Path) -> None:
    sharegpt = {"conversations": [{"from": "human", "value": "北京天气怎么样？"},
                                  {"from": "function_call", "value": json.dumps(CALL, ensure_ascii=False)},
                                  {"from": "observation", "value": '{"temp": 20}'},
                                  {"from": "gpt", "value": "北京今天20度，晴。"}],
                "tools": json.dumps(TOOLS, ensure_ascii=False)}  # LLaMA-Factory writes tools as a JSON string
    openai = {"messages": [{"role": "user", "content": "上海呢？"},
                           {"role": "assistant", "content": None, "tool_calls": [
                               {"type": "function", "function": {"name": "get_weather",
                                                                 "arguments": '{"city": "上海ＳＨ"}'}}]},
                           {"role": "tool", "content": '{"temp": 25}'},
                           {"role": "assistant", "content": "上海今天25度。"}], "tools": TOOLS}
    for name, row in (("sharegpt", sharegpt), ("messages", openai)):
        path = write_jsonl(tmp_path / f"{name}.jsonl", [row])
        report, out = process(tmp_path / name, [path])
        assert report["inputs"][0]["format"] == name
        [record] = out_rows(out)
        assert record["tools"] == TOOLS  # tool definitions and call arguments are not text to clean
        arguments = record["messages"][1]["tool_calls"][0]["function"]["arguments"]
        assert arguments == ({"city": "北京"} if name == "sharegpt" else {"city": "上海ＳＨ"})
        # The output trains exactly as the input would: the same messages, tool calls and tools.
        keys = ("messages", "tools")
        assert trained(load_conversations(str(out / "train.jsonl")), keys) == trained(load_conversations(str(path)),
                                                                                       keys)


def test_llama_factory_dpo_with_message_object_replies(tmp_path: Path) -> None:
    rows = [{"conversations": [{"from": "human", "value": "发烧了可以喝酒发汗吗？"}],
             "chosen": {"from": "gpt", "value": "不可以，饮酒会加重身体负担。"},
             "rejected": {"from": "gpt", "value": "可以，喝点白酒。"}},
            {"conversations": [{"from": "human", "value": "感冒要吃抗生素吗？"}],
             "chosen": {"from": "gpt", "value": "普通感冒多为病毒感染，不需要抗生素。"},
             "rejected": {"from": "gpt", "value": "要，越早越好。"}}]
    path = write_jsonl(tmp_path / "dpo.jsonl", rows)
    report, out = process(tmp_path, [path])
    assert report["inputs"][0]["format"] == "preference" and report["rows_out"] == 2
    assert out_rows(out)[0] == {"messages": [{"role": "user", "content": "发烧了可以喝酒发汗吗？"}],
                                "chosen": "不可以，饮酒会加重身体负担。", "rejected": "可以，喝点白酒。"}
    keys = ("prompt", "chosen", "rejected", "tools")
    assert trained(load_preference_pairs(str(out / "train.jsonl"))[0], keys) == trained(
        load_preference_pairs(str(path))[0], keys)


def test_preference_prompt_ending_in_a_tool_result_keeps_calls_and_tools(tmp_path: Path) -> None:
    row = {"messages": [{"role": "user", "content": "北京天气？"},
                        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                            "name": "get_weather", "arguments": '{"city": "北京"}'}}]},
                        {"role": "tool", "content": '{"temp": 20}'}],
           "chosen": {"role": "assistant", "content": "北京今天20度。"}, "rejected": "我不知道。", "tools": TOOLS}
    path = write_jsonl(tmp_path / "dpo.jsonl", [row])
    _, out = process(tmp_path, [path])
    [record] = out_rows(out)
    assert record["messages"][-1] == {"role": "tool", "content": '{"temp": 20}'}
    assert record["messages"][1]["tool_calls"] == [{"type": "function", "function": CALL}]
    assert (record["chosen"], record["rejected"], record["tools"]) == ("北京今天20度。", "我不知道。", TOOLS)
    keys = ("prompt", "chosen", "rejected", "tools")
    pairs = load_preference_pairs(str(out / "train.jsonl"))[0]
    assert trained(pairs, keys) == trained(load_preference_pairs(str(path))[0], keys)
    assert pairs[0]["tools"] == TOOLS


def test_every_dpo_shape_is_accepted_and_written_in_one(tmp_path: Path) -> None:
    user = {"role": "user", "content": "鼻子出血要仰头吗？"}
    good, bad = "不要仰头，身体稍前倾，捏紧鼻翼。", "要仰头。"
    rows = [{"prompt": [user], "chosen": [{"role": "assistant", "content": good}],
             "rejected": [{"role": "assistant", "content": bad}]},
            {"chosen": [user, {"role": "assistant", "content": good}],
             "rejected": [user, {"role": "assistant", "content": bad}]},
            {"prompt": "鼻子出血要仰头吗？", "system": "你是医生。", "chosen": good, "rejected": bad}]
    for i, row in enumerate(rows):
        path = write_jsonl(tmp_path / f"{i}.jsonl", [row])
        _, out = process(tmp_path / str(i), [path])
        prompt = [{"role": "system", "content": "你是医生。"}, user] if "system" in row else [user]
        assert out_rows(out) == [{"messages": prompt, "chosen": good, "rejected": bad}]
        keys = ("prompt", "chosen", "rejected")
        assert trained(load_preference_pairs(str(out / "train.jsonl"))[0], keys) == trained(
            load_preference_pairs(str(path))[0], keys)


def _trainer_problems(load: Any, path: Path) -> list[str]:
    with pytest.raises(DataError) as exc:
        load(str(path))
    return [line.strip() for line in str(exc.value).splitlines() if line.strip().startswith(str(path))]


def test_rows_the_trainers_refuse_are_refused_with_their_messages(tmp_path: Path) -> None:
    cases = {
        "dpo": ([{"question": "问题？", "chosen": "好", "rejected": "坏"},  # DPO reads no 'question' prompt
                 {"prompt": "问题？", "chosen": {"role": "user", "content": "x"}, "rejected": "坏"},
                 {"prompt": "问题？", "chosen": "好"}],
                lambda p: load_preference_pairs(p)),
        "sft": ([{"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}],
                  "label": False},  # a KTO row
                 {"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}],
                  "tools": "not json"}],
                load_conversations),
        "qa": ([{"prompt": "1+1=?", "ground_truth": " "}, {"messages": [{"role": "assistant", "content": "x"}],
                                                           "ground_truth": "y"}],
               load_prompts),
    }
    for name, (rows, load) in cases.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        expected = _trainer_problems(load, path)
        assert len(expected) == len(rows), expected
        with pytest.raises(DataError) as exc:
            process(tmp_path / name, [path])
        assert [line.strip() for line in str(exc.value).splitlines() if line.strip().startswith(str(path))
                ] == expected, name
        assert f"{len(rows)} problem(s)" in str(exc.value)


def test_prompt_rows_of_every_rl_shape_load_in_the_rl_loader(tmp_path: Path) -> None:
    rows = [{"question": "中医五行中，脾对应哪一行？", "answer": "土"},
            {"question": "人体哪个器官分泌胰岛素？", "ground_truth": "胰腺", "system": "只回答器官名称。"},
            {"prompt": "成人正常腋下体温上限？", "ground_truth": 37, "data_source": "med", "ability": "qa",
             "extra_info": {"max_reply_chars": 8}},
            {"prompt": [{"role": "user", "content": "五味是酸苦甘辛和什么？"}], "answer": "咸"}]
    path = write_jsonl(tmp_path / "grpo.jsonl", rows)
    report, out = process(tmp_path, [path])
    assert report["inputs"][0]["format"] == "qa" and report["rows_out"] == len(rows)
    written = out_rows(out)
    assert written[0] == rows[0]  # a plain question row keeps its shape
    assert written[1] == {"prompt": [{"role": "system", "content": "只回答器官名称。"},
                                     {"role": "user", "content": "人体哪个器官分泌胰岛素？"}], "ground_truth": "胰腺"}
    assert written[2]["data_source"] == "med" and written[2]["extra_info"] == {"max_reply_chars": 8}
    keys = ("messages", "ground_truth", "ability", "extra_info")
    assert trained(load_prompts(str(out / "train.jsonl")), keys) == trained(load_prompts(str(path)), keys)
    assert load_prompts(str(out / "train.jsonl"))[2]["data_source"] == "med"
    # A chat ending on the reference reply reads as SFT under --format auto; --format qa reads it as a prompt.
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "胸外按压深度下限？"}, {"role": "assistant", "content": "5"}]}])
    _, out = process(tmp_path / "chat", [chat], format="qa")
    assert out_rows(out) == [{"prompt": [{"role": "user", "content": "胸外按压深度下限？"}], "ground_truth": "5"}]
    assert trained(load_prompts(str(out / "train.jsonl")), keys) == trained(load_prompts(str(chat)), keys)


def test_json_array_rows_are_cited_by_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"text": "第一条文字。"},\n  {"text": 7},\n  {"text": "第三条。"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: 'text' must be a string"):
        process(tmp_path, [path])


# --- item 9: the default cleaning keeps Chinese punctuation; the report counts what each rule changed ----------


def test_default_keeps_chinese_punctuation_and_nfkc_is_an_option(tmp_path: Path) -> None:
    text = "吃什么药呢？，性生活（注意）；结论：好。"
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": text}])
    _, out = process(tmp_path / "default", [path])
    assert out_rows(out) == [{"text": text}]
    cfg = load_process_config(["--input", str(path), "--unicode_form", "NFKC", "--output_dir", str(tmp_path / "n"),
                               "--num_proc", "1", "--val_ratio", "0"])
    run(cfg)
    assert out_rows(cfg.out_dir) == [{"text": "吃什么药呢?,性生活(注意);结论:好。"}]
    old_yaml = tmp_path / "old.yaml"  # a config written before the default changed
    old_yaml.write_text(f"input: [{path}]\nunicode_form: NFKC\n", encoding="utf-8")
    assert load_process_config(["--config", str(old_yaml)]).unicode_form == "NFKC"
    shipped = load_process_config(["--config", str(ROOT / "config" / "data_config" / "process.yaml")])
    assert shipped.unicode_form == ProcessConfig().unicode_form == "safe"


def test_safe_form_folds_fullwidth_letters_digits_and_odd_spaces_only() -> None:
    cfg = ProcessConfig()
    assert clean_text("ＡＢＣ１２３ｘｙｚ，体温３７．５度？", cfg) == "ABC123xyz，体温37．5度？"
    assert clean_text("a\u00a0b\u2003c\u202fd\u205fe\u2009f", cfg) == "a b c d e f"
    assert clean_text("\u3000\u3000段落首行缩进。", cfg) == "段落首行缩进。"  # leading/trailing: whitespace rule
    assert clean_text("第一句。\u3000第二句。", cfg) == "第一句。\u3000第二句。"  # inside a text U+3000 stays
    assert clean_text("ﬁ①㎏", cfg) == "ﬁ①㎏"  # other compatibility characters are NFKC's business
    assert clean_text("ﬁ①㎏ＡＢ", ProcessConfig(unicode_form="NFKC")) == "fi1kgAB"
    assert clean_text("ＡＢ\u00a0，", ProcessConfig(unicode_form="none")) == "ＡＢ\u00a0，"


def test_report_counts_characters_changed_per_rule(tmp_path: Path) -> None:
    rows = [{"text": "Ｈｉ２\u00a0你好，\x00世界  \r\n\r\n\r\n\r\n结束\u200b "},  # 3 unicode, 1 space, 2 control
            {"text": "没有要改的。"},
            {"text": "短\u2003"}]  # one space: folded, then stripped as trailing whitespace
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    report, out = process(tmp_path, [path], min_chars=3, keep_rejected=True)
    assert report["rows_out"] == 2  # the short row is removed, but its cleaning is counted
    # whitespace: the 4 CRs of CRLF, 2 trailing spaces, 2 extra newlines (4 -> 2), the final space; row 3: 1
    assert report["characters_changed"] == {
        "unicode": {"enabled": True, "chars": 3, "rows": 1}, "spaces": {"enabled": True, "chars": 2, "rows": 2},
        "control": {"enabled": True, "chars": 2, "rows": 1}, "whitespace": {"enabled": True, "chars": 10, "rows": 2}}
    assert out_rows(out)[0] == {"text": "Hi2 你好，世界\n\n结束"}
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "## Characters changed by cleaning" in markdown and "| unicode_form safe | 3 | 1 |" in markdown
    report, _ = process(tmp_path / "nfkc", [path], min_chars=3, unicode_form="NFKC", strip_control=False)
    changed = report["characters_changed"]
    # NFKC folds Ｈｉ２ ， \u00a0 (row 1) and \u2003 (row 3) itself; no separate space rule, control off.
    assert changed["unicode"] == {"enabled": True, "chars": 6, "rows": 2}
    assert changed["spaces"] == changed["control"] == {"enabled": False, "chars": 0, "rows": 0}
