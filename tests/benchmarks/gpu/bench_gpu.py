"""One H100 / H200: MFU of full fine-tuning a Qwen2.5-1.5B-shaped model, and LoRA tokens/s against TRL.

    uv run python tests/benchmarks/gpu/bench_gpu.py              # one GPU, about 8 minutes; JSON in ../results/
    uv run python tests/benchmarks/gpu/bench_gpu.py --dry-run    # anywhere (no GPU): the plan, every command checked

Runs bench_sft.py (the same probe, same data, same settings for every system) on a random model of Qwen2.5-1.5B's
shape (28 layers, hidden 1,536, 12 / 2 heads, MLP 8,960, vocabulary 151,936 with the real Qwen2.5 tokenizer), bf16,
one round each:

    full_packed          our SFT stage, full fine-tuning, packed (per-document attention), gradient checkpointing off
    full_packed_ckpt     the same with gradient checkpointing on
    full_packed_liger    the same as full_packed with use_liger_kernel (only when liger-kernel is installed)
    lora                 LoRA r=8 q/k/v/o: ours packed, ours unpacked, TRL BFD packing, TRL unpacked

MFU = steady tokens/s x FLOPs per token / the card's bf16 dense peak (H100 SXM / H200: 989 TFLOP/s; H100 PCIe:
756; anything else: --peak-tflops). FLOPs per token = 6 x parameters (the tied LM head counted once: its matmul
runs, the embedding lookup does not) + 6 x layers x hidden x mean document length (causal attention, forward and
backward). The first --warmup-steps steps are left out of the steady rate (allocator, kernel autotuning).
Not run in CI and never asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
sys.path.insert(0, str(BENCH))
from bench_common import RESULTS, SHAPES, machine, write_json  # noqa: E402

PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4}  # bf16 dense, no sparsity


def plan(args: argparse.Namespace, liger: bool) -> list[tuple[str, list[str]]]:
    base = ["--shape", "qwen1.5b", "--device", "cuda", "--rounds", "1", "--threads", "8",
            "--rows", str(args.rows), "--max-length", "1024", "--logging-steps", "1",
            "--warmup-steps", str(args.warmup_steps), "--model-cache", str(args.model_cache)]
    full = base + ["--full", "--systems", "ours_packed", "--steps", str(args.steps), "--batch-size",
                   str(args.full_batch), "--learning-rate", "1e-5"]
    runs = [("full_packed", full), ("full_packed_ckpt", full + ["--gradient-checkpointing"])]
    if liger:
        runs.append(("full_packed_liger", full + ["--liger"]))
    runs.append(("lora", base + ["--systems", "ours_packed,ours,trl_packed,trl_tuned", "--steps", str(args.steps),
                                 "--batch-size", str(args.lora_batch), "--learning-rate", "2e-4"]))
    return runs


def flops_per_token(params: int, mean_doc: float) -> float:
    spec = SHAPES["qwen1.5b"]
    return 6 * params + 6 * spec["layers"] * spec["hidden"] * mean_doc


def peak_tflops(name: str, given: float | None) -> float | None:
    if given:
        return given
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def shape_params() -> int:
    """Parameters of the 1.5B shape, counted on the meta device (no memory, no GPU)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    spec = SHAPES["qwen1.5b"]
    config = Qwen2Config(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                         num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                         num_key_value_heads=spec["kv_heads"], tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="check the plan and the commands; needs no GPU")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--full-batch", type=int, default=16, help="rows per step, full fine-tuning (packed)")
    parser.add_argument("--lora-batch", type=int, default=16)
    parser.add_argument("--peak-tflops", type=float, help="the card's bf16 dense peak when not an H100 / H200")
    parser.add_argument("--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "self_model_bench_qwen1.5b")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import importlib.util

    import torch

    liger = importlib.util.find_spec("liger_kernel") is not None
    flash = importlib.util.find_spec("flash_attn") is not None
    runs = plan(args, liger)
    sys.path.insert(0, str(BENCH))
    import bench_sft

    for _, cmd in runs:  # every command parses: a typo fails here, not on the GPU machine
        bench_sft.parse_args(cmd)
    params = shape_params()
    print(f"Qwen2.5-1.5B shape: {params:,} parameters; liger-kernel {'installed' if liger else 'absent'}; "
          f"flash-attn {'installed' if flash else 'absent'} (packed rows use our per-document sdpa_varlen either way)")
    for name, cmd in runs:
        print(f"  {name}: python tests/benchmarks/bench_sft.py {' '.join(cmd)}")
    if args.dry_run:
        print(f"dry run: {len(runs)} runs planned, FLOPs/token at 300-token documents "
              f"{flops_per_token(params, 300):.3g}; nothing was run")
        return
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on a GPU machine (or --dry-run to check the plan)")
    device = torch.cuda.get_device_name(0)
    peak = peak_tflops(device, args.peak_tflops)
    out: dict[str, Any] = {"benchmark": "gpu", "device": device, "peak_tflops_bf16": peak, "machine": machine(),
                           "params": params, "liger_kernel": liger, "flash_attn": flash, "runs": {}}
    started = time.time()
    for name, cmd in runs:
        result = Path(tempfile.mkdtemp()) / f"{name}.json"
        proc = subprocess.run([sys.executable, str(BENCH / "bench_sft.py"), *cmd, "--json", str(result)],
                              capture_output=True, text=True)
        print(proc.stdout[-3000:])
        if proc.returncode != 0:
            print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            out["runs"][name] = {"error": proc.stderr[-3000:]}
            continue
        data = json.loads(result.read_text(encoding="utf-8"))
        summary = {}
        # Ours hands the collator one row per document (packed or not): its tokens per row are the mean document.
        ours = next(data["runs"][s][0] for s in ("ours_packed", "ours") if s in data["runs"])
        mean_doc = ours["tokens_per_step"] / max(ours["rows_per_step"], 1)
        for system, rs in data["runs"].items():
            r = rs[0]
            mfu = r["steady_tokens_per_second"] * flops_per_token(params, mean_doc) / (peak * 1e12) if peak else None
            summary[system] = {"steady_tokens_per_second": r["steady_tokens_per_second"], "mfu": mfu,
                               "peak_rss_mb": r["peak_rss_mb"], "attn_implementation": r["attn_implementation"]}
            print(f"{name} {system}: {r['steady_tokens_per_second']:,.0f} tok/s"
                  + (f", MFU {100 * mfu:.1f}% (6N counts LoRA's frozen weights too)" if mfu is not None else ""))
        out["runs"][name] = {"command": cmd, "summary": summary, "raw": data}
    out["seconds"] = round(time.time() - started)
    path = write_json(args.json or RESULTS / f"gpu_{time.strftime('%Y%m%d_%H%M')}.json", out)
    print(f"JSON: {path} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
