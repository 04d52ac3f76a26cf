"""Export a run's result as a standalone model: merge a LoRA adapter into its base (with proof), optionally quantize.

    uv run python self_model/tools/export_model.py --config config/self_model_config/export.yaml
    uv run python self_model/tools/export_model.py --config ... model_name_or_path=runs/sft/final output_dir=out/sft
    uv run python self_model/tools/export_model.py --config ... quantize.method=nf4 --dry-run

Input: any run's final/ (or the run folder, a checkpoint-N/, an export), full weights or an adapter; its base is
found from the run. Output (written as <output_dir>.tmp, renamed when everything passed; never overwritten):
safetensors weights, the tokenizer with the run's chat template, generation_config.json with the end-of-turn ids,
README.md (model card with the lineage), export_report.json (merge check; perplexity, size and load time before and
after quantization), run_info.json (the chain, so later stages can start from the export).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from self_model.core.cli import run_main
from self_model.core.errors import UserError
from self_model.core.run import write_run_info
from self_model.tools.export_card import write_report
from self_model.tools.export_config import METHODS, ExportConfig
from self_model.tools.export_data import check_prompts, held_out_texts, read_texts, run_data
from self_model.tools.export_merge import export_tokenizer, inspect_source, merge_with_proof, torch_dtype
from self_model.tools.export_quantize import check_quantizable_early, quantize_export

logger = logging.getLogger("self_model")


def main(cfg: ExportConfig, dry_run: bool = False) -> Path | None:
    source = inspect_source(cfg)  # not a run, missing / mismatched / quantized base: refused before any work
    data = run_data(source.run_config, source.stage)
    tokenizer, template = export_tokenizer(cfg, source)
    prompts, prompt_files = check_prompts(data, cfg.check.data_file, tokenizer, cfg.check.prompts)
    quantize = cfg.quantize.method != "none"
    held_out, eval_text = held_out_texts(data, cfg.quantize.eval_file, tokenizer) if quantize else ([], None)
    check_quantizable_early(cfg, source.start.model)
    dtype = torch_dtype(cfg, source)
    if dry_run:
        print("\n=== dry run: nothing is written ===")
        print(f"source:   {source.folder} ({'adapter' if source.adapter else 'full weights'}); weights: "
              f"{source.start.describe()}")
        print(f"dtype:    {dtype}; check on {len(prompts)} prompts from {prompt_files}")
        print(f"quantize: {METHODS[cfg.quantize.method]}" + (f"; perplexity on {eval_text}" if quantize else ""))
        print(f"output:   {cfg.output_dir}")
        return None

    out = Path(cfg.output_dir)
    if out.exists():
        raise UserError(f"output_dir: {out} exists; an export is never overwritten. Choose another output_dir.")
    tmp, merged = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".merged.tmp")
    for leftover in (tmp, merged):
        shutil.rmtree(leftover, ignore_errors=True)  # a crashed export's remains
    try:
        check = merge_with_proof(cfg, source, tokenizer, template, prompts, dtype, merged if quantize else tmp)
        report = {"source": source.summary(), "output": str(out),
                  "check": {**check, "prompts": prompts, "data_files": prompt_files}}
        if quantize:
            calibration = read_texts(data.train or data.eval, tokenizer, data.text_fields,
                                     cfg.quantize.calibration_samples)
            report["quantization"] = quantize_export(cfg, merged, tmp, dtype, tokenizer, held_out, calibration)
            report["eval_text"] = eval_text
        write_run_info(tmp, cfg, {"export": {"source": report["source"], "quantization": cfg.quantize.method}})
        write_report(tmp, report, source.start, source.folder, str(out))
        tmp.rename(out)
    finally:
        for leftover in (tmp, merged):
            shutil.rmtree(leftover, ignore_errors=True)
    print(f"\nexported to {out}\nmerge check: max |logit difference| {check['max_abs_diff']:.3g} "
          f"(tolerance {check['tolerance']:.3g}, {check['dtype']})")
    if quantize:
        q = report["quantization"]
        print(f"{q['method']}: perplexity {q['perplexity_before']:.4g} -> {q['perplexity_after']:.4g}; weights "
              f"{q['size_bytes_before'] / 1e6:.2f} MB -> {q['size_bytes_after'] / 1e6:.2f} MB; load "
              f"{q['load_seconds_before']:.2f} s -> {q['load_seconds_after']:.2f} s")
    return out


if __name__ == "__main__":
    run_main(main, ExportConfig, __doc__)
