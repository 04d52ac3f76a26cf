"""Write the pipeline demo's data from one small knowledge table (disease -> symptoms, advice, department).

    uv run python data_process/sample_data/demo/make_demo_data.py

Deterministic: the same files on every run (they are committed; rerun after editing KNOWLEDGE or a template).
Every text states the table's facts in a few fixed sentence patterns, so that the embedded tiny model (2 layers,
hidden 64, random weights) can learn them in minutes on a CPU and the pipeline shows it learned:
  raw_corpus.txt        plain text for continued pretraining, with the mess `process_data.py` removes (exact and
                        near duplicates, fragments, control characters)
  pretrain_eval.txt     held-out text: the same facts in sentence pairs the corpus never has (and a few lines in
                        sentence patterns it never uses)
  sft_train.jsonl       ShareGPT Q&A: every disease asked several ways, one consistent answer per disease
  sft_eval.jsonl        the same diseases asked in phrasings training never sees
  dpo_*.jsonl           the consistent answer (chosen) against an unhelpful or wrong one (rejected)
  grpo_*.jsonl          {"question", "answer"}: which department to visit, the answer a department name
  terms.txt             the table's words, for the vocabulary extension's word_list
The content is simplified general health information written for this project, not medical advice.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

# disease: (symptoms, advice, department)
KNOWLEDGE: dict[str, tuple[list[str], list[str], str]] = {
    "感冒": (["鼻塞", "流涕", "咽痛"], ["多休息", "多喝水"], "呼吸内科"),
    "流感": (["高热", "肌肉酸痛", "乏力"], ["及时就医", "居家隔离"], "呼吸内科"),
    "胃炎": (["上腹痛", "恶心", "食欲不振"], ["规律饮食", "少吃辛辣"], "消化内科"),
    "高血压": (["头晕", "头痛", "心悸"], ["低盐饮食", "按时服药"], "心内科"),
    "糖尿病": (["多饮", "多尿", "体重下降"], ["控制饮食", "监测血糖"], "内分泌科"),
    "失眠": (["入睡困难", "容易醒", "白天疲倦"], ["规律作息", "睡前少看手机"], "神经内科"),
    "湿疹": (["皮肤瘙痒", "红斑", "丘疹"], ["保湿护肤", "避免搔抓"], "皮肤科"),
    "腹泻": (["大便次数增多", "腹痛", "口渴"], ["补充水分", "清淡饮食"], "消化内科"),
    "哮喘": (["喘息", "胸闷", "咳嗽"], ["避开过敏原", "随身带吸入药"], "呼吸内科"),
    "贫血": (["面色苍白", "头晕", "乏力"], ["多吃含铁食物", "查明原因"], "血液科"),
    "偏头痛": (["单侧头痛", "怕光", "恶心"], ["安静休息", "避免诱因"], "神经内科"),
    "结膜炎": (["眼红", "眼痒", "分泌物增多"], ["勿揉眼睛", "注意用眼卫生"], "眼科"),
}

# Continued pretraining: what the corpus says (train) and how the held-out file says it (never in train).
CORPUS_PATTERNS = [
    "{d}的常见症状有{s}。",
    "{d}患者应注意{a}。",
    "得了{d}一般到{k}就诊。",
    "出现{s}时，可能是{d}，建议{a}。",
    "{d}的主要表现是{s}，平时要{a}，症状加重时到{k}就诊。",
    "关于{d}：症状为{s}；建议{a}；就诊科室为{k}。",
]
HELD_OUT_PATTERNS = [
    "{d}常常表现为{s}，建议{a}。",
    "如果怀疑{d}，可以到{k}看病，并注意{a}。",
]
# SFT: training phrasings and held-out phrasings of the same question; one answer per disease.
TRAIN_QUESTIONS = ["{d}有什么症状？", "得了{d}怎么办？", "{d}是什么表现？", "我可能得了{d}，该注意什么？",
                   "{d}需要看哪个科？", "请介绍一下{d}。"]
EVAL_QUESTIONS = ["{d}有哪些表现？", "怀疑自己得了{d}，应该怎么做？"]
ANSWER = "{d}的常见症状有{s}。建议{a}，必要时到{k}就诊。"
# DPO: systematically worse replies (unhelpful, or another disease's facts).
UNHELPFUL = ["不知道，你自己上网查吧。", "这个问题没什么好问的。", "随便吃点药就好了。", "别问我，问别人去。"]
# GRPO: short verifiable answers.
GRPO_TRAIN_QUESTIONS = ["{d}应该看哪个科室？只回答科室名称。", "得了{d}去哪个科？只回答科室名称。"]
GRPO_EVAL_QUESTIONS = ["{d}挂哪个科的号？只回答科室名称。"]


def facts(d: str) -> dict[str, str]:
    symptoms, advice, department = KNOWLEDGE[d]
    return {"d": d, "s": "、".join(symptoms), "a": "、".join(advice), "k": department}


def answer(d: str) -> str:
    return ANSWER.format(**facts(d))


def sharegpt(question: str, reply: str) -> dict:
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]}


def sentence_pairs(rng: random.Random, rounds: int) -> list[str]:
    """Every pattern for every disease, `rounds` times over, two sentences a line in shuffled pairs."""
    sentences = [p.format(**facts(d)) for d in KNOWLEDGE for p in CORPUS_PATTERNS]
    lines = []
    for _ in range(rounds):
        rng.shuffle(sentences)
        lines += [a + b for a, b in zip(sentences[::2], sentences[1::2])]
    return list(dict.fromkeys(lines))


def raw_corpus(clean: list[str], rng: random.Random) -> list[str]:
    """The corpus plus the mess a cleaning stage must remove."""
    mess = [clean[i] for i in range(0, 24, 3)]                       # exact duplicates
    mess += [clean[i].replace("。", "！", 1) for i in range(1, 24, 4)]  # near duplicates
    mess += ["感冒。", "注意", "\x07\x07"]                              # fragments and control characters
    mixed = clean + mess
    rng.shuffle(mixed)
    return mixed


def main() -> None:
    rng = random.Random(0)
    corpus = sentence_pairs(rng, 6)
    out: dict[str, list] = {
        "raw_corpus.txt": raw_corpus(corpus, rng),
        # Held-out lines: pairs of sentences the corpus never puts together, and two sentence patterns it never uses.
        "pretrain_eval.txt": [line for line in sentence_pairs(random.Random(1), 1) if line not in corpus][:24]
        + [p.format(**facts(d)) for d in list(KNOWLEDGE)[:4] for p in HELD_OUT_PATTERNS],
        "sft_train.jsonl": [sharegpt(q.format(d=d), answer(d)) for q in TRAIN_QUESTIONS for d in KNOWLEDGE],
        "sft_eval.jsonl": [sharegpt(q.format(d=d), answer(d)) for q in EVAL_QUESTIONS for d in KNOWLEDGE],
        "terms.txt": sorted({w for d, (s, a, k) in KNOWLEDGE.items() for w in [d, *s, *a, k]}),
    }
    diseases = list(KNOWLEDGE)
    for name, questions in (("dpo_train.jsonl", TRAIN_QUESTIONS), ("dpo_eval.jsonl", EVAL_QUESTIONS)):
        pairs = []
        for i, q in enumerate(questions):
            for j, d in enumerate(diseases):
                other = diseases[(j + 1 + i) % len(diseases)]
                worse = UNHELPFUL[(i + j) % len(UNHELPFUL)] if (i + j) % 2 else answer(other)
                pairs.append({"conversations": [{"from": "human", "value": q.format(d=d)}],
                              "chosen": answer(d), "rejected": worse})
        out[name] = pairs
    for name, questions in (("grpo_train.jsonl", GRPO_TRAIN_QUESTIONS), ("grpo_eval.jsonl", GRPO_EVAL_QUESTIONS)):
        out[name] = [{"question": q.format(d=d), "answer": KNOWLEDGE[d][2]} for q in questions for d in diseases]
    for name, rows in out.items():
        text = "".join((json.dumps(r, ensure_ascii=False) if isinstance(r, dict) else r) + "\n" for r in rows)
        (HERE / name).write_text(text, encoding="utf-8")
        print(f"{HERE / name}: {len(rows)} rows")
    (HERE / "knowledge.json").write_text(json.dumps(
        {d: {"symptoms": s, "advice": a, "department": k} for d, (s, a, k) in KNOWLEDGE.items()},
        ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
