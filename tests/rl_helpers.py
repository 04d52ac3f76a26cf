"""Helpers shared by the PPO / GRPO tests (test_grpo.py, test_verl.py): an SFT adapter and configs from rlhf.yaml."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data_process" / "sample_data"
TEMPLATE = ROOT / "self_model" / "template" / "qwen2_chatml.json"
SHIPPED = yaml.safe_load((ROOT / "config" / "self_model_config" / "rlhf.yaml").read_text(encoding="utf-8"))


def make_sft_adapter(tiny_model_dir: Path, out: Path) -> Path:
    """An SFT result as train_finetune.py writes it (adapter + tokenizer with the template's chat_template), with
    random, non-zero LoRA weights so that the SFT model clearly differs from the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from self_model.template.chat_template import load_template

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, lora).save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    load_template(TEMPLATE).apply_to_tokenizer(tokenizer)
    tokenizer.save_pretrained(out)
    return out


def rl_config(cls: type, tiny_model_dir: Path, output_dir: Path, adapter: Path | None = None,
              overrides: dict[str, Any] | None = None) -> Any:
    """The shipped rlhf.yaml pointed at the tiny model (and an SFT adapter), the sample prompts and a temp folder."""
    from self_model.core.config import load_config

    data = copy.deepcopy(SHIPPED)
    data.update(model_name_or_path=str(tiny_model_dir), template_path=str(TEMPLATE),
                tokenizer_name_or_path=str(adapter or tiny_model_dir),
                adapter_name_or_path=str(adapter) if adapter else None)
    data["data"].update(train_file=str(SAMPLES / "dpo_train.jsonl"), eval_file=str(SAMPLES / "dpo_eval.jsonl"))
    data["ppo"].update(train_file=str(SAMPLES / "grpo_train.jsonl"), eval_file=str(SAMPLES / "grpo_eval.jsonl"),
                       output_dir=str(output_dir))
    data["ppo"]["trl_args"].update(disable_tqdm=True)
    return load_config(cls, None, [f"{k}={v}" for k, v in (overrides or {}).items()], data=data)
