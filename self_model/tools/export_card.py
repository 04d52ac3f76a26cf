"""What an export writes about itself: export_report.json (the merge check, the quantization's cost) and a short
model card README.md with the lineage (base -> each stage -> this export), read from the runs' run_info.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from self_model.core.lineage import Start, read_run_info

REPORT = "export_report.json"


def lineage_lines(start: Start, source_folder: str) -> list[str]:
    """base -> stages -> this export, one line each, from the source's run record (and the runs before it)."""
    info = read_run_info(source_folder) or {}
    chain = [*info.get("lineage", [])]
    if info:
        chain.append({"path": source_folder, "stage": info.get("stage"),
                      "kind": "adapter" if start.given_adapter else "full"})
    base = info.get("base_model") or start.base_model or start.model
    lines = [f"1. base model: `{base}`"]
    for i, run in enumerate(chain, 2):
        lines.append(f"{i}. {run.get('stage') or 'a run'} ({run.get('kind', '?')}): `{run.get('path')}`")
    return lines


def size_line(report: dict[str, Any]) -> str:
    q = report["quantization"]
    return (f"| {q['method']} | {q['perplexity_before']:.4g} | {q['perplexity_after']:.4g} | "
            f"{q['size_bytes_before'] / 1e6:.2f} MB | {q['size_bytes_after'] / 1e6:.2f} MB | "
            f"{q['load_seconds_before']:.2f} s | {q['load_seconds_after']:.2f} s |")


def model_card(name: str, report: dict[str, Any], start: Start, source_folder: str) -> str:
    check, quant, source = report["check"], report.get("quantization"), report["source"]
    what = "LoRA adapter merged into its base" if source["kind"] == "adapter" else "full weights"
    if source.get("trained_on_4bit_base"):
        what += " (a QLoRA adapter: merged into the full-precision base, not the 4-bit weights it trained on)"
    form = f", quantized: {quant['what']}" if quant else f", {check['dtype']} weights"
    against = "base + adapter" if source["kind"] == "adapter" else "the source weights"
    files = ", ".join(f"`{f}`" for f in check["data_files"])
    chain = lineage_lines(start, source_folder)
    lines = [
        f"# {name}", "",
        f"Exported by self_model (`self_model/tools/export_model.py`) on {time.strftime('%Y-%m-%d')}: {what}{form}.",
        "", "## Lineage", "", *chain, f"{len(chain) + 1}. this export: `{name}`", "",
        "## Merge check", "",
        f"Logits of the saved weights against {against} on {len(check['prompts'])} prompts from {files} "
        f"({check['positions']} positions, {check['dtype']}): max |difference| {check['max_abs_diff']:.3g}, "
        f"tolerance {check['tolerance']:.3g}; top-1 agreement {check['top1_agreement']:.1%}.", "",
    ]
    if quant:
        text = report["eval_text"]
        kind = "held-out" if text["held_out"] else "training"
        lines += ["## Quantization", "",
                  f"Perplexity on {kind} text ({quant['eval_tokens']} tokens of {', '.join(text['files'])}), weights "
                  f"on disk and `from_pretrained` time ({quant['device']}):", "",
                  "| method | perplexity before | after | size before | after | load before | after |",
                  "|---|---|---|---|---|---|---|", size_line(report), ""]
    serve = f"vLLM: `vllm serve {name}`"
    if quant and quant["method"] in ("int8", "nf4"):
        serve += " (bitsandbytes weights: vLLM's bitsandbytes support; GPTQ is its fast 4-bit path)"
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model = AutoModelForCausalLM.from_pretrained("{name}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{name}")  # with the chat template it was trained with',
              "```", "", serve, "", "Details: `export_report.json`; the chain of runs: `run_info.json`.", ""]
    return "\n".join(lines)


def write_report(folder: Path, report: dict[str, Any], start: Start, source_folder: str, name: str) -> None:
    (folder / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (folder / "README.md").write_text(model_card(name, report, start, source_folder), encoding="utf-8")
