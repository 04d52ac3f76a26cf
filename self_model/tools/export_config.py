"""The schema of config/self_model_config/export.yaml (self_model/tools/export_model.py)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from self_model.core.config import existing_files
from self_model.core.stage_config import adapter_folder, local_or_hub

# Largest |logit difference| allowed between the merged model and base + adapter, relative to the largest |logit|
# (at least 1): float32 sums in another order only; 16-bit formats round the merged weights themselves.
RELATIVE_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}
# What each method writes, and the library that does it.
METHODS = {
    "none": "full precision (the merged weights in `dtype`)",
    "int8": "bitsandbytes LLM.int8 (8-bit weights; transformers loads it with bitsandbytes installed)",
    "nf4": "bitsandbytes NF4 (4-bit weights, double quantization; transformers loads it with bitsandbytes)",
    "gptq": "GPTQ W4A16 by llm-compressor, saved as compressed-tensors (vLLM serves it; transformers loads it with "
            "compressed-tensors installed)",
}
LLMCOMPRESSOR_HINT = ("quantize.method: gptq needs llm-compressor, which is not installed here: uv sync --extra "
                      "export, or uv pip install 'llmcompressor>=0.14.1a20261020' (a pre-release: the stable 0.14.0.1 "
                      "caps transformers at 5.17)")


# Names users try that mean one of ours, or that we do not write, each with what to use instead.
METHOD_HINTS = {
    "awq": "AutoAWQ is archived and does not load with transformers 5; gptq writes the same kind of vLLM-served "
           "4-bit weights (W4A16)",
    "int4": "use nf4 (bitsandbytes, 4-bit) or gptq (4-bit, served by vLLM)",
    "4bit": "use nf4 (bitsandbytes, 4-bit) or gptq (4-bit, served by vLLM)",
    "bnb_4bit": "use nf4", "fp4": "use nf4 (NF4 is the better 4-bit type for normally distributed weights)",
    "8bit": "use int8", "bnb_8bit": "use int8", "llm_int8": "use int8",
    "fp8": "FP8 needs a GPU with FP8 support and is not written by this tool; use int8, nf4 or gptq",
    "gguf": "GGUF is llama.cpp's format: convert the merged export (method none) with llama.cpp's "
            "convert_hf_to_gguf.py",
}


def check_method(value: str, path: str) -> list[str]:
    """Field check: one of METHODS, with what to use instead for a known other name."""
    if value in METHODS:
        return []
    from self_model.core.config import did_you_mean

    hint = METHOD_HINTS.get(value.lower())
    return [f"{path}: unsupported quantization method {value!r}"
            + (f": {hint}" if hint else did_you_mean(value, METHODS)) + f"; choose one of {list(METHODS)}"]


@dataclass
class CheckSection:
    """`check:` the merged model against base + adapter, on fixed prompts from the run's own data."""

    # Prompts: the first rows of the run's training data (run_config.yaml names the files) ...
    prompts: int = 4
    # ... or of these files (.jsonl chat / text rows, .txt lines).
    data_file: str | list[str] | None = field(default=None, metadata={"check": existing_files})
    # Tokens per prompt at most.
    max_tokens: int = 128
    # Largest |logit difference| allowed; null: by dtype (float32 1e-4, bfloat16 3e-2, float16 5e-3 times the largest
    # |logit|, at least 1).
    tolerance: float | None = None

    def __post_init__(self) -> None:
        if self.prompts < 1 or self.max_tokens < 2:
            raise ValueError(f"check.prompts must be at least 1 and check.max_tokens at least 2, got {self.prompts} "
                             f"and {self.max_tokens}")
        if self.tolerance is not None and self.tolerance <= 0:
            raise ValueError(f"check.tolerance must be positive, got {self.tolerance}")


@dataclass
class QuantizeSection:
    """`quantize:` the exported weights: none, int8 / nf4 (bitsandbytes) or gptq (llm-compressor, what vLLM serves)."""

    method: str = field(default="none", metadata={"check": check_method})
    # Held-out text for perplexity before / after: these files, else the run's eval file, else its training data.
    eval_file: str | list[str] | None = field(default=None, metadata={"check": existing_files})
    # Tokens of held-out text scored (in blocks of block_size).
    eval_tokens: int = 4096
    block_size: int = 256
    # gptq: calibration rows (the run's training data) and their length; weights share one scale per group_size
    # inputs (128 is what vLLM's kernels expect; -1: one per output channel).
    calibration_samples: int = 128
    calibration_max_length: int = 512
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.eval_tokens < 16 or self.block_size < 8 or self.calibration_samples < 1:
            raise ValueError("quantize.eval_tokens must be at least 16, block_size at least 8 and calibration_samples "
                             "at least 1")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"quantize.group_size must be positive or -1 (per channel), got {self.group_size}")


@dataclass
class ExportConfig:
    """config/self_model_config/export.yaml"""

    # A run's final/ (or the run folder), a checkpoint-N/ or an export: full weights or a LoRA adapter (its base is
    # found from the run: run_info.json, else adapter_config.json).
    model_name_or_path: str = field(metadata={"check": local_or_hub})
    # The new folder: a standalone model (never overwritten; written as <output_dir>.tmp, then renamed).
    output_dir: str
    # An adapter on the base in model_name_or_path, when the adapter's own record does not name the base you want
    # (e.g. the full-precision original of a QLoRA run).
    adapter_name_or_path: str | None = field(default=None, metadata={"check": adapter_folder})
    # The saved weights' dtype; auto: the base model's own.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    check: CheckSection = field(default_factory=CheckSection)
    quantize: QuantizeSection = field(default_factory=QuantizeSection)
    trust_remote_code: bool = False

    def validate(self) -> list[str]:
        errors = []
        out = Path(self.output_dir)
        if out.exists():
            errors.append(f"output_dir: {out} exists; an export is never overwritten. Choose another folder "
                          f"(e.g. output_dir={out}-2) or remove it yourself")
        if self.quantize.method == "gptq" and importlib.util.find_spec("llmcompressor") is None:
            errors.append(LLMCOMPRESSOR_HINT)
        if self.quantize.method in ("int8", "nf4") and importlib.util.find_spec("bitsandbytes") is None:
            errors.append(f"quantize.method: {self.quantize.method} needs bitsandbytes: uv sync")
        return errors
