"""Chat with a trained model in the terminal: multi-turn, streamed token by token.

    uv run python self_model/tools/chat.py --model self_model/checkpoints/finetune/final
    uv run python self_model/tools/chat.py --config config/self_model_config/inference.yaml generation.temperature=0
    uv run python self_model/tools/chat.py --model <folder> --template-path self_model/template/qwen2_chatml.json

--model is any run's final/, an export or a quantized export (full weights or a LoRA adapter); its saved chat
template and stop ids are used. Shortcuts: --model, --system, --template-path, --backend; any YAML key as
KEY=VALUE (generation.max_new_tokens=256, generation.repetition_penalty=1.1). In the chat: /clear forgets the
conversation, /exit (or Ctrl-D) quits.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from self_model.core.cli import run_main
from self_model.core.inference import inspect_model, load_inference_tokenizer
from self_model.core.rows import RowError
from self_model.template.chat_template import load_template
from self_model.tools.generate import InferenceConfig, choose_backend, inference_argv, load_engine

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "self_model_config" / "inference.yaml"
HELP = "/clear: new conversation · /exit or Ctrl-D: quit"


def main(cfg: InferenceConfig, dry_run: bool = False) -> None:
    template = load_template(cfg.template_path) if cfg.template_path else None
    if dry_run:
        folder = inspect_model(cfg.model_name_or_path)
        load_inference_tokenizer(folder, template, cfg.trust_remote_code)  # a chat template is there, or fits
        print(f"would chat with {folder.path} ({folder.kind}) on {choose_backend(cfg.backend)}; {cfg.generation}")
        return
    engine = load_engine(cfg, template)
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    messages: list[dict[str, Any]] = list(system)
    print(f"chatting with {cfg.model_name_or_path} ({engine.name}). {HELP}", flush=True)
    while True:
        try:
            text = input("\nuser> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/clear":
            messages = list(system)
            print("(conversation cleared)")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        pieces = []
        try:
            for piece in engine.stream(messages, cfg.generation):
                pieces.append(piece)
                print(piece, end="", flush=True)
        except RowError as exc:  # the conversation outgrew the context: say so, keep chatting
            messages.pop()
            print(f"\nerror: {exc}; /clear starts a new conversation", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:
            print(" (stopped)")
        messages.append({"role": "assistant", "content": "".join(pieces).strip()})
        speed = engine.last_tokens / engine.last_seconds if engine.last_seconds else 0.0
        print(flush=True)
        print(f"({engine.last_tokens} tokens, {speed:.1f} tokens/s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    run_main(main, InferenceConfig, __doc__, inference_argv(sys.argv[1:], DEFAULT_CONFIG))
