"""Load a trained result (full weights or a LoRA adapter) and answer a chat prompt with its own template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_for_inference(model_dir: str | Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if (model_dir / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                         trust_remote_code=trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code)
    if (model_dir / "generation_config.json").exists():
        # An adapter loads its base model's generation config; ours stops on the template's end-of-turn ids.
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    model.eval()
    return model, tokenizer


@torch.no_grad()
def chat(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int = 48,
         do_sample: bool = False) -> str:
    """Render with the saved chat_template, generate until an end-of-turn id, return the reply text."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                            pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
