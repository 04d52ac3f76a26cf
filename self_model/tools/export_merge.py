"""Merge a run's result into a standalone model, and prove the merge: the merged weights, saved and loaded back,
must compute the logits that base + adapter computed, on fixed prompts from the run's own data.

The source is read as every stage reads its start (`core.lineage`): full weights as they are; an adapter on the
base its run recorded (with any adapters that run had merged in memory first). A QLoRA adapter is merged into the
full-precision base, never into 4-bit weights: the base is loaded here without any quantization. A base that is
already quantized (GPTQ, AWQ, bitsandbytes) is refused: a LoRA delta cannot be added exactly to quantized weights.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from self_model.core.errors import UserError
from self_model.core.lineage import Start, is_adapter, model_config, read_run_info, resolve_start, result_folder
from self_model.core.modeling import attach_adapter
from self_model.tools.export_config import RELATIVE_TOLERANCE, ExportConfig
from self_model.tools.export_data import read_run_config

logger = logging.getLogger("self_model")
# Files of a result folder that travel with the export (the tokenizer is saved anew; weights are written merged).
CARRIED_FILES = ("chat_template_source.json", "generation_config.json")


@dataclass
class Source:
    """What is exported: the result folder, how its weights are built, and what its run said about itself."""

    folder: str  # the result folder (final/, checkpoint-N/, an export, or a base model)
    start: Start  # core.lineage: full weights + adapters merged in order (the last one: this export's adapter)
    adapter: str | None  # the adapter this export merges, None for full weights
    run_config: dict[str, Any] = field(default_factory=dict)
    stage: str | None = None  # the stage of the training run behind it (run_info.json)

    @property
    def qlora(self) -> bool:
        return bool((self.run_config.get("peft") or {}).get("qlora"))

    def summary(self) -> dict[str, Any]:
        return {"folder": self.folder, "kind": "adapter" if self.adapter else "full", "base": self.start.model,
                "adapters_merged": self.start.merged, "trained_on_4bit_base": self.qlora,
                "stage": self.stage}


def not_a_result(path: Path) -> UserError:
    """The error for a folder that holds no model: say what is inside and what to point at instead."""
    checkpoints = sorted(path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                         if re.fullmatch(r"checkpoint-\d+", p.name) else -1)
    if checkpoints or (path / "run_info.json").is_file():
        hint = (f"; export one of its checkpoints instead, e.g. model_name_or_path={checkpoints[-1]}" if checkpoints
                else "; it holds no checkpoint either (the run failed before saving one)")
        return UserError(f"{path} is a run folder without final/: the run did not finish{hint}")
    return UserError(f"{path} is not a run's result: it holds neither config.json (full weights) nor "
                     "adapter_config.json (a LoRA adapter), nor a final/ folder. Point model_name_or_path at a run's "
                     "final/ (e.g. self_model/checkpoints/finetune/final), one of its checkpoint-N/ or an export.")


def inspect_source(cfg: ExportConfig) -> Source:
    """Read what is exported without loading weights; every refusal (not a run, missing or mismatched base, a
    quantized base) happens here, before anything is written."""
    folder = result_folder(cfg.adapter_name_or_path or cfg.model_name_or_path)
    path = Path(folder)
    if path.is_dir() and not (path / "config.json").is_file() and not is_adapter(path):
        raise not_a_result(path)
    start = resolve_start(cfg.model_name_or_path, cfg.adapter_name_or_path, mode="merge", peft_enabled=False)
    run_config, stage = training_run(folder) if path.exists() else ({}, None)
    source = Source(folder=str(path.resolve()) if path.exists() else folder, start=start,
                    adapter=start.given_adapter, run_config=run_config, stage=stage)
    refuse_quantized(source, model_config(start.model))
    return source


def training_run(folder: str) -> tuple[dict[str, Any], str | None]:
    """(run_config.yaml, stage) of the training run behind a result; for an export, of the run it exported."""
    info = read_run_info(folder) or {}
    if info.get("stage") == "export" and info.get("lineage"):
        trained = info["lineage"][-1]
        return read_run_config(trained["path"]), trained.get("stage")
    return read_run_config(folder), info.get("stage")


def refuse_quantized(source: Source, config: dict[str, Any] | None) -> None:
    """A base (or a full-weight source) with quantized weights is refused, with the reason and the fix."""
    quant = (config or {}).get("quantization_config")
    if not quant:
        return
    method = quant.get("quant_method", "?") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
    if source.adapter:
        raise UserError(f"the base {source.start.model} is quantized ({method}): a LoRA adapter cannot be merged into "
                        "quantized weights (W + BA would need quantizing again, losing the adapter's change or the "
                        "quantization's calibration). Point model_name_or_path at the full-precision original of "
                        "that base (e.g. the hub id without -GPTQ / -AWQ / -bnb) with adapter_name_or_path="
                        f"{source.adapter}, and quantize the merged export (quantize.method); or serve the base with "
                        "the adapter unmerged (vLLM --enable-lora).")
    raise UserError(f"{source.start.model} is already quantized ({method}); export from its full-precision weights "
                    "(the run's final/ before quantization) to merge or quantize again.")


def torch_dtype(cfg: ExportConfig, source: Source) -> torch.dtype:
    """export.yaml `dtype`; auto: the base's own (float32 when it names none)."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    config = model_config(source.start.model) or {}
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name) if name in RELATIVE_TOLERANCE else torch.float32


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_source(cfg: ExportConfig, source: Source, dtype: torch.dtype) -> Any:
    """Base (full precision, never 4-bit) + adapters merged earlier in the chain + this export's adapter, unmerged."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source.start.model, dtype=dtype,
                                                     trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the base model {source.start.model}: {str(exc)[:400]}\nPoint "
                        "model_name_or_path (or adapter_name_or_path, with the base in model_name_or_path) at a "
                        "folder that holds it.") from None
    refuse_quantized(source, {"quantization_config": getattr(model.config, "quantization_config", None)})
    earlier = source.start.merged[:-1] if source.adapter else source.start.merged
    for adapter in earlier:
        model = attach_adapter(model, adapter, trainable=False).merge_and_unload()
    if source.adapter:
        model = attach_adapter(model, source.adapter, trainable=False)
    return model.to(device()).eval()


def export_tokenizer(cfg: ExportConfig, source: Source) -> tuple[Any, Any]:
    """(tokenizer, template or None): the result's own tokenizer with its chat template. The run's template
    (template_path / template in its config) is loaded only where the result lacks something it gives: a chat
    template (a checkpoint saved before it was applied) or generation_config.json (the end-of-turn ids)."""
    from transformers import AutoTokenizer

    folder = source.folder if (Path(source.folder) / "tokenizer_config.json").is_file() else source.start.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer of {folder}: {str(exc)[:300]}") from None
    run = source.run_config
    lacks = not getattr(tokenizer, "chat_template", None) or not (Path(source.folder) / "generation_config.json"
                                                                   ).is_file()
    if not (lacks and (run.get("template_path") or run.get("template"))):
        return tokenizer, None
    from types import SimpleNamespace

    from self_model.template.resolve import resolve_template

    template = resolve_template(SimpleNamespace(template_path=run.get("template_path"), template=run.get("template")),
                                tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        template.apply_to_tokenizer(tokenizer)
    return tokenizer, template


def encode(tokenizer: Any, texts: list[str], max_tokens: int) -> list[torch.Tensor]:
    return [tokenizer(t, return_tensors="pt", add_special_tokens=False, truncation=True,
                      max_length=max_tokens)["input_ids"] for t in texts]


@torch.no_grad()
def logits_of(model: Any, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    dev = next(model.parameters()).device
    return [model(input_ids=ids.to(dev)).logits.float().cpu() for ids in batches]


def merge_and_save(model: Any, source: Source, tokenizer: Any, template: Any, out: Path) -> None:
    """merge_and_unload (for an adapter) and save weights, tokenizer, generation config and template source."""
    merged = model.merge_and_unload() if source.adapter else model
    merged.config.use_cache = True  # turned off for training
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    for name in CARRIED_FILES:
        if (Path(source.folder) / name).is_file():
            shutil.copy(Path(source.folder) / name, out / name)
    if template is not None:  # the result lacked a chat template or generation_config.json: the run's template
        from self_model.core.run import save_generation_config

        if not (out / "chat_template_source.json").is_file():
            template.save_source(out)
        if not (Path(source.folder) / "generation_config.json").is_file():
            save_generation_config(merged, tokenizer, template, out)


def load_saved(folder: Path, dtype: torch.dtype, trust_remote_code: bool) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype,
                                                trust_remote_code=trust_remote_code).to(device()).eval()


def compare(reference: list[torch.Tensor], merged: list[torch.Tensor], dtype: torch.dtype,
            tolerance: float | None) -> dict[str, Any]:
    """Max |logit difference| against a tolerance (given, else relative to the logits' scale for the dtype)."""
    diff = max(float((a - b).abs().max()) for a, b in zip(reference, merged))
    scale = max(float(a.abs().max()) for a in reference)
    name = str(dtype).removeprefix("torch.")
    allowed = tolerance if tolerance is not None else RELATIVE_TOLERANCE[name] * max(1.0, scale)
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, merged))
    positions = sum(a.shape[1] for a in reference)
    return {"max_abs_diff": diff, "tolerance": allowed, "tolerance_rule": "check.tolerance" if tolerance is not None
            else f"{RELATIVE_TOLERANCE[name]} x max(1, largest |logit| {scale:.4g}) for {name}", "dtype": name,
            "positions": positions, "top1_agreement": agree / max(positions, 1), "passed": diff <= allowed}


def check_failed(check: dict[str, Any], source: Source) -> UserError:
    what = "base + adapter" if source.adapter else "the source weights"
    return UserError(f"the merged model does not compute what {what} computed: max |logit difference| "
                     f"{check['max_abs_diff']:.3g} > tolerance {check['tolerance']:.3g} ({check['tolerance_rule']}) "
                     f"on {check['positions']} positions; top-1 agreement {check['top1_agreement']:.1%}. Nothing was "
                     "written. With dtype bfloat16 / float16, try dtype: float32; if the adapter was trained on "
                     "another base, point model_name_or_path at that base; check.tolerance raises the limit.")


def merge_with_proof(cfg: ExportConfig, source: Source, tokenizer: Any, template: Any, prompts: list[str],
                     dtype: torch.dtype, folder: Path) -> dict[str, Any]:
    """Load base + adapter, score the prompts, merge and save into `folder`, load the saved weights back, score again;
    raise (the caller removes `folder`) when the logits differ by more than the tolerance. Returns the check."""
    model = load_source(cfg, source, dtype)
    batches = encode(tokenizer, prompts, cfg.check.max_tokens)
    reference = logits_of(model, batches)
    merge_and_save(model, source, tokenizer, template, folder)
    del model
    merged = load_saved(folder, dtype, cfg.trust_remote_code)
    check = compare(reference, logits_of(merged, batches), dtype, cfg.check.tolerance)
    logger.info("merge check: max |logit difference| %.3g (tolerance %.3g) on %d positions", check["max_abs_diff"],
                check["tolerance"], check["positions"])
    if not check["passed"]:
        raise check_failed(check, source)
    return check
