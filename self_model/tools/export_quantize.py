"""Quantize a merged export, and measure what it cost.

- int8 / nf4: bitsandbytes through transformers' `BitsAndBytesConfig` (the weights are quantized while loading the
  merged folder, then saved; `AutoModelForCausalLM.from_pretrained(folder)` loads them back with bitsandbytes).
  Works on CPU (bitsandbytes >= 0.48) and GPU.
- gptq: llm-compressor's `GPTQModifier`, calibrated on rows of the run's training data, saved in the
  compressed-tensors format (W4A16) that vLLM serves; transformers loads it with compressed-tensors installed
  (decompressed on CPU). Runs on CPU for small models; a GPU makes it practical for real ones.

Each quantized export reports perplexity on held-out text before and after, weights on disk before and after, and
the time `from_pretrained` takes for each (export_report.json).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from self_model.core.errors import UserError
from self_model.tools.export_config import METHODS, ExportConfig, QuantizeSection

logger = logging.getLogger("self_model")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def weights_size(folder: Path) -> int:
    """Bytes of weight files in the folder."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.suffix in WEIGHT_SUFFIXES)


def timed_load(folder: Path, dtype: torch.dtype, trust_remote_code: bool) -> tuple[Any, float]:
    """The folder loaded with plain transformers (quantization read from its config.json), and the seconds it took."""
    from transformers import AutoModelForCausalLM

    begin = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, trust_remote_code=trust_remote_code,
                                                 **({"device_map": "cuda"} if torch.cuda.is_available() else {}))
    return model.eval(), time.perf_counter() - begin


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, texts: list[str], max_tokens: int, block_size: int) -> tuple[float, int]:
    """exp(mean next-token loss) over the texts joined with eos, cut into blocks; (perplexity, tokens scored)."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + (
            [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        if len(ids) > max_tokens:
            break
    ids = ids[:max_tokens + 1]  # max_tokens predicted tokens
    if len(ids) < 2:
        raise UserError("quantize: the held-out text has fewer than 2 tokens; set quantize.eval_file to more text")
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    with warnings.catch_warnings():  # bitsandbytes int8 on CPU warns at every matmul that it casts to float16
        warnings.simplefilter("ignore", UserWarning)
        for begin in range(0, len(ids) - 1, block_size):
            block = torch.tensor([ids[begin:begin + block_size + 1]], device=dev)
            if block.shape[1] < 2:
                break
            logits = model(input_ids=block[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], block[0, 1:], reduction="sum")
            total, count = total + float(loss), count + block.shape[1] - 1
    return math.exp(min(total / count, 50.0)), count


def check_quantizable(section: QuantizeSection, model: Any) -> None:
    """What the method cannot do for this model, refused before quantizing: GPTQ groups must divide each layer."""
    if section.method != "gptq" or section.group_size == -1:
        return
    output = model.get_output_embeddings()
    bad = sorted({m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not output
                  and m.in_features % section.group_size})
    if bad:
        fits = [g for g in (128, 64, 32) if all(f % g == 0 for f in bad)]
        raise UserError(f"quantize.method: gptq with group_size {section.group_size} is unsupported for this model: "
                        f"its linear layers take {bad} inputs, not a multiple of {section.group_size}. Set "
                        f"quantize.group_size: {fits[0] if fits else -1}" + (" (vLLM's 4-bit kernels prefer 128)"
                                                                            if fits else " (one scale per channel)"))


def check_quantizable_early(cfg: ExportConfig, model_path: str) -> None:
    """`check_quantizable` on the model built on the meta device from its config: refused before anything loads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.quantize.method != "gptq":
        return
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        check_quantizable(cfg.quantize, AutoModelForCausalLM.from_config(config,
                                                                         trust_remote_code=cfg.trust_remote_code))


def bitsandbytes_config(method: str, dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def quantize_bitsandbytes(section: QuantizeSection, merged: Path, out: Path, dtype: torch.dtype,
                          trust_remote_code: bool) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=dtype, trust_remote_code=trust_remote_code,
                                                 quantization_config=bitsandbytes_config(section.method, dtype),
                                                 **({"device_map": "cuda"} if torch.cuda.is_available() else {}))
    model.save_pretrained(str(out))


def gptq_recipe(section: QuantizeSection) -> Any:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    group = {"strategy": "channel"} if section.group_size == -1 else {"strategy": "group",
                                                                       "group_size": section.group_size}
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, **group)
    return GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                        ignore=["lm_head"])


def quantize_gptq(section: QuantizeSection, merged: Path, out: Path, dtype: torch.dtype, tokenizer: Any,
                  calibration: list[str], trust_remote_code: bool) -> None:
    """GPTQ W4A16 with llm-compressor, calibrated on `calibration` (the run's training rows)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    if not torch.cuda.is_available():
        logger.warning("quantize.method: gptq calibrates on the CPU here: fine for a small model, hours for a 7B one "
                       "(run the export on a GPU machine for real models)")
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=dtype, trust_remote_code=trust_remote_code)
    rows = [tokenizer(t, add_special_tokens=False, truncation=True, max_length=section.calibration_max_length)
            for t in calibration[:section.calibration_samples]]
    dataset = Dataset.from_list([{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in rows])
    oneshot(model=model, dataset=dataset, recipe=gptq_recipe(section), max_seq_length=section.calibration_max_length,
            num_calibration_samples=len(rows))
    model.save_pretrained(str(out), save_compressed=True)


def library_of(method: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    name = {"int8": "bitsandbytes", "nf4": "bitsandbytes", "gptq": "llmcompressor"}[method]
    try:
        return f"{name} {version(name)}"
    except PackageNotFoundError:
        return name


def quantize_export(cfg: ExportConfig, merged: Path, out: Path, dtype: torch.dtype, tokenizer: Any,
                    held_out: list[str], calibration: list[str]) -> dict[str, Any]:
    """Quantize the merged folder into `out` (with the merged folder's tokenizer and configs) and measure both."""
    section = cfg.quantize
    if section.method not in METHODS or section.method == "none":
        raise UserError(f"quantize.method: {section.method!r} is not a quantization method; choose {list(METHODS)}")
    before_model, load_before = timed_load(merged, dtype, cfg.trust_remote_code)
    check_quantizable(section, before_model)
    ppl_before, tokens = perplexity(before_model, tokenizer, held_out, section.eval_tokens, section.block_size)
    del before_model
    out.mkdir(parents=True, exist_ok=True)
    if section.method in ("int8", "nf4"):
        quantize_bitsandbytes(section, merged, out, dtype, cfg.trust_remote_code)
    else:
        quantize_gptq(section, merged, out, dtype, tokenizer, calibration, cfg.trust_remote_code)
    for item in merged.iterdir():  # tokenizer, generation config, template source: everything but the weights
        if item.is_file() and item.suffix not in WEIGHT_SUFFIXES and not (out / item.name).exists():
            shutil.copy(item, out / item.name)
    after_model, load_after = timed_load(out, dtype, cfg.trust_remote_code)
    ppl_after, _ = perplexity(after_model, tokenizer, held_out, section.eval_tokens, section.block_size)
    report = {"method": section.method, "what": METHODS[section.method], "library": library_of(section.method),
              "perplexity_before": ppl_before, "perplexity_after": ppl_after, "eval_tokens": tokens,
              "size_bytes_before": weights_size(merged), "size_bytes_after": weights_size(out),
              "load_seconds_before": round(load_before, 3), "load_seconds_after": round(load_after, 3),
              "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if section.method == "gptq":
        report.update(group_size=section.group_size, calibration_rows=min(len(calibration),
                                                                          section.calibration_samples))
    logger.info("quantized (%s): perplexity %.4g -> %.4g, weights %.1f MB -> %.1f MB", section.method, ppl_before,
                ppl_after, report["size_bytes_before"] / 1e6, report["size_bytes_after"] / 1e6)
    return report
