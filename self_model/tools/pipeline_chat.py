"""The pipeline's closing stage: a few questions answered by the last model, printed and written to answers.json.

It answers through `self_model.core.inference` (the code behind chat.py, generate.py and the SFT run's closing
answer): the model folder's own chat template and stop tokens, greedy decoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from self_model.core.stage_config import local_or_hub


def non_empty(value: list[str], path: str) -> list[str]:
    return [] if value and all(q.strip() for q in value) else [f"{path}: list at least one non-empty question"]


@dataclass
class ChatStageConfig:
    """A `kind: chat` stage (no YAML of its own: its keys go in the stage's overrides)."""

    model_name_or_path: str = field(metadata={"check": local_or_hub})
    output_dir: str
    questions: list[str] = field(default_factory=lambda: ["感冒有什么症状？"], metadata={"check": non_empty})
    max_new_tokens: int = 64


def main(cfg: ChatStageConfig, dry_run: bool = False) -> Path | None:
    from self_model.core.inference import chat, load_for_inference

    if dry_run:
        return None
    model, tokenizer = load_for_inference(cfg.model_name_or_path)
    answers = []
    for question in cfg.questions:
        answer = chat(model, tokenizer, [{"role": "user", "content": question}], max_new_tokens=cfg.max_new_tokens)
        answers.append({"question": question, "answer": answer})
        print(f"Q: {question}\nA: {answer}\n")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "answers.json.tmp"  # answers.json marks the stage finished: written whole or not at all
    tmp.write_text(json.dumps(answers, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.rename(out / "answers.json")
    return out
