"""SFT speed: our SFT stage against a plain TRL `SFTTrainer`, side by side on the same tiny model and data.

    uv run python tests/benchmarks/bench_sft.py                          # tiny Qwen2 (hidden 64), 3 repeats
    uv run python tests/benchmarks/bench_sft.py --hidden-size 256        # a few M params: arithmetic dominates
    uv run python tests/benchmarks/bench_sft.py --systems ours,trl_tuned --repeats 5
    uv run python tests/benchmarks/bench_sft.py --only ours_packed --profile   # cProfile of the training loop

Not a test (pytest only collects test_*.py): speed is measured here, never asserted. Every system trains
the same tiny Qwen2 on the same 600 chat rows with LoRA r=8 on q/k/v/o, batch 8, 30 steps, fp32, the same
max_length, learning rate and seed, on 2 CPU threads. Each run is a fresh subprocess of this script, so
import costs and peak RSS are its own; the parent interleaves the repeats (ours, TRL, ours, TRL, ...) so
machine noise hits every system alike, and prints medians.

Speed is counted the same way for every system, outside either trainer: non-padding tokens are the
lengths of the rows handed to the data collator (so padding added by a collator never counts), summed
over the optimizer steps taken, divided by the wall time from `on_train_begin` to `on_train_end` (model
loading and tokenization excluded). Trained tokens are the labels != -100 the collator produced: they
show the loss masks are comparable (TRL's defaults train on the prompt too).

Training is always fp32: these CPUs have no bf16 units, and bf16 would run hundreds of times slower.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "medicalgpt" / "medical_sft_1K_format.jsonl"
SAMPLE_DATA = ROOT / "data_process" / "sample_data" / "sft_train.jsonl"
TEMPLATE = ROOT / "self_model" / "template" / "qwen2_chatml.json"

SYSTEMS = {
    "trl_defaults": "TRL SFTTrainer as a user writes it: messages rows, its defaults (gradient checkpointing, "
    "loss on prompt + reply, chunked loss with entropy/accuracy), but fp32",
    "trl_tuned": "TRL, no gradient checkpointing, prompt/completion rows, completion-only loss",
    "trl_packed": "trl_tuned + BFD padding-free packing (documents kept apart)",
    "ours": "self_model SFT, data.packing: false",
    "ours_packed": "self_model SFT, data.packing: true (documents kept apart)",
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ROLE_OF = {"human": "user", "gpt": "assistant", "system": "system"}


# ---- shared inputs: the tiny model, its tokenizer with the chat template, the rows ---------------------
def prepare_inputs(work: Path, hidden: int, rows: int) -> tuple[Path, Path]:
    """Build the tiny model (its tokenizer carries our ChatML template as `chat_template`, so TRL renders
    exactly what our template renders) and write the training rows (ShareGPT JSON lines)."""
    from transformers import AutoTokenizer

    from self_model.template.chat_template import load_template
    from self_model.tools.make_tiny_model import make_tiny_model

    model_dir = make_tiny_model(work / f"tiny_qwen2_h{hidden}", hidden=hidden)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    load_template(TEMPLATE).apply_to_tokenizer(tokenizer)
    tokenizer.save_pretrained(model_dir)

    if SHARED_DATA.exists():
        lines = SHARED_DATA.read_text(encoding="utf-8").splitlines()[:rows]
    else:
        print(f"note: {SHARED_DATA} is absent; repeating {SAMPLE_DATA} instead", file=sys.stderr)
        sample = [line for line in SAMPLE_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
        lines = (sample * (rows // len(sample) + 1))[:rows]
    data_file = work / "sft_rows.jsonl"
    data_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return model_dir, data_file


def matmul_gflops(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """The CPU's fp32 matrix-product rate on `threads` threads: the ceiling for utilisation."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


# ---- what every child measures -------------------------------------------------------------------------
class Probe:
    """Counts what the collator hands the model and times the training loop, identically for both trainers."""

    def __init__(self, profile: bool = False):
        # (non-padding tokens, trained tokens, tokens with padding) per collated batch
        self.batches: list[tuple[int, int, int]] = []
        self.start = self.end = self.cpu_start = self.cpu_end = 0.0
        self.profiler = cProfile.Profile() if profile else None

    def attach(self, trainer: Any) -> Any:
        from transformers import TrainerCallback

        probe, collate = self, trainer.data_collator

        def counted(features: list[dict[str, Any]]) -> dict[str, Any]:
            batch = collate(features)
            real = sum(len(f["input_ids"]) for f in features)
            probe.batches.append((real, int((batch["labels"] != -100).sum()), batch["input_ids"].numel()))
            return batch

        class Timer(TrainerCallback):
            def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
                probe.start, probe.cpu_start = time.perf_counter(), time.process_time()
                if probe.profiler:
                    probe.profiler.enable()

            def on_train_end(self, *args: Any, **kwargs: Any) -> None:
                if probe.profiler:
                    probe.profiler.disable()
                probe.end, probe.cpu_end = time.perf_counter(), time.process_time()

        trainer.data_collator = counted
        trainer.add_callback(Timer())
        return trainer

    def result(self, trainer: Any) -> dict[str, Any]:
        steps = trainer.state.global_step
        used = self.batches[:steps]  # the dataloader may collate one batch ahead of the last step
        tokens, trained = sum(b[0] for b in used), sum(b[1] for b in used)
        seconds, cpu_seconds = self.end - self.start, self.cpu_end - self.cpu_start
        losses = [
            e.get("loss", e.get("train_loss")) for e in trainer.state.log_history if "loss" in e or "train_loss" in e
        ]
        base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        return {
            "steps": steps,
            "train_seconds": round(seconds, 3),
            "tokens": tokens,
            "trained_tokens": trained,
            "tokens_per_second": round(tokens / seconds, 1),
            "cpu_seconds": round(cpu_seconds, 3),
            "load_avg": round(os.getloadavg()[0], 2),
            "tokens_per_step": tokens / max(steps, 1),
            "trained_per_step": trained / max(steps, 1),
            "padded_per_step": sum(b[2] for b in used) / max(steps, 1),
            "final_loss": float(losses[-1]),
            "params": sum(p.numel() for p in base.parameters()),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }


def common_args(output_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Training arguments every system shares (TrainingArguments field names)."""
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": args.steps,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": "cosine",
        "seed": 42,
        "logging_steps": 10,
        "save_strategy": "no",
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def run_ours(
    system: str, model_dir: Path, data_file: Path, out: Path, args: argparse.Namespace, probe: Probe
) -> dict[str, Any]:
    """Our SFT entry point, unchanged: main(cfg) with the trainer it builds instrumented by the probe."""
    import self_model.fine_tuning.train_finetune as entry
    from self_model.core.config import load_config
    from self_model.fine_tuning.config import FinetuneConfig

    data = {
        "model_name_or_path": str(model_dir),
        "tokenizer_name_or_path": str(model_dir),
        "template_path": str(TEMPLATE),
        "data": {"train_file": str(data_file), "max_length": args.max_length, "packing": system == "ours_packed"},
        "peft": {"enabled": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": LORA_TARGETS},
        "training_args": common_args(out, args),
    }
    cfg = load_config(FinetuneConfig, None, [], data=data)
    built: list[Any] = []
    build = entry.build_sft_trainer

    def instrumented(*a: Any, **k: Any) -> Any:
        built.append(probe.attach(build(*a, **k)))
        return built[-1]

    entry.build_sft_trainer = instrumented
    entry.main(cfg)
    return probe.result(built[0])


def trl_rows(data_file: Path, prompt_completion: bool) -> Any:
    from datasets import Dataset

    rows = []
    for line in data_file.read_text(encoding="utf-8").splitlines():
        turns = [{"role": ROLE_OF[t["from"]], "content": t["value"]} for t in json.loads(line)["conversations"]]
        rows.append({"prompt": turns[:-1], "completion": turns[-1:]} if prompt_completion else {"messages": turns})
    return Dataset.from_list(rows)


def run_trl(
    system: str, model_dir: Path, data_file: Path, out: Path, args: argparse.Namespace, probe: Probe
) -> dict[str, Any]:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tuned = system != "trl_defaults"
    extra: dict[str, Any] = {"max_length": args.max_length}
    if tuned:
        extra.update(gradient_checkpointing=False, completion_only_loss=True)
    if system == "trl_packed":
        extra.update(packing=True, packing_strategy="bfd")  # bfd implies padding_free: documents kept apart
    config = SFTConfig(**common_args(out, args), **extra)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=trl_rows(data_file, prompt_completion=tuned),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=lora,
    )
    probe.attach(trainer).train()
    return probe.result(trainer)


def child(args: argparse.Namespace) -> None:
    """One system, one run, in this process; the result goes to --result as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix=f"bench_sft_{args.only}_"))
    try:
        if args.model is None or args.data is None:
            args.model, args.data = prepare_inputs(work, args.hidden_size, args.rows)
        probe = Probe(profile=args.profile)
        runner = run_ours if args.only.startswith("ours") else run_trl
        result = runner(args.only, args.model, args.data, work / "run", args, probe)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if probe.profiler:
        stats = pstats.Stats(probe.profiler, stream=sys.stdout).strip_dirs()
        print(f"\n=== cProfile of {args.only}: training loop only, by own time ===")
        stats.sort_stats("tottime").print_stats(30)
        print(f"=== cProfile of {args.only}: by cumulative time ===")
        stats.sort_stats("cumulative").print_stats(40)
    print(json.dumps(result))
    if args.result:
        args.result.write_text(json.dumps(result), encoding="utf-8")


# ---- the parent: interleaved repeats, one subprocess each, and the table ------------------------------
def run_child(system: str, model_dir: Path, data_file: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    result_file = work / f"{system}.json"
    cmd = [
        sys.executable,
        __file__,
        "--only",
        system,
        "--model",
        str(model_dir),
        "--data",
        str(data_file),
        "--result",
        str(result_file),
        "--threads",
        str(args.threads),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--learning-rate",
        str(args.learning_rate),
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not result_file.exists():
        sys.exit(f"{system} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    result = json.loads(result_file.read_text(encoding="utf-8"))
    result_file.unlink()
    return result


def summarize(runs: dict[str, list[dict[str, Any]]], gflops: float, threads: int) -> list[str]:
    """The table: medians by wall time (the number that matters) and by CPU time (robust to a busy machine)."""
    wall = {s: statistics.median(r["tokens_per_second"] for r in rs) for s, rs in runs.items()}
    cpu = {s: statistics.median(r["tokens"] / r["cpu_seconds"] for r in rs) for s, rs in runs.items()}

    def ratio(speeds: dict[str, float], system: str, base: str) -> str:
        return f"{speeds[system] / speeds[base]:.2f}" if base in speeds else "-"

    lines = [
        "| system | tok/s | min-max | x TRL tuned | x TRL defaults | tok/CPU-s | x TRL tuned (CPU) "
        "| tokens/step (padded) | trained/step | peak RSS MB | final loss | util |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for system, rs in runs.items():
        speeds = [r["tokens_per_second"] for r in rs]
        first = rs[0]
        # Utilisation: tokens/s x 6 x params / the measured fp32 matmul rate (6N overstates LoRA's work,
        # which skips the frozen weights' gradients: by at most 1.5x).
        util = wall[system] * 6 * first["params"] / (gflops * 1e9)
        lines.append(
            f"| {system} | {wall[system]:,.0f} | {min(speeds):,.0f}-{max(speeds):,.0f} "
            f"| {ratio(wall, system, 'trl_tuned')} | {ratio(wall, system, 'trl_defaults')} | {cpu[system]:,.0f} "
            f"| {ratio(cpu, system, 'trl_tuned')} | {first['tokens_per_step']:,.0f} ({first['padded_per_step']:,.0f}) "
            f"| {first['trained_per_step']:,.0f} "
            f"| {statistics.median(r['peak_rss_mb'] for r in rs):,.0f} "
            f"| {statistics.median(r['final_loss'] for r in rs):.3f} | {100 * util:.1f}% |"
        )
    params = next(iter(runs.values()))[0]["params"]
    loads = [r["load_avg"] for rs in runs.values() for r in rs]
    lines.append(
        f"\n{len(next(iter(runs.values())))} interleaved runs each; model {params:,} params; {threads} "
        f"threads; fp32 matmul peak {gflops:.0f} GFLOP/s; 1-min load average {min(loads)}-{max(loads)} "
        f"(above {threads}: other work shared the cores, trust the CPU-time columns more)."
    )
    return lines


def parent(args: argparse.Namespace) -> None:
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        sys.exit(f"--systems: unknown {unknown}; known: {list(SYSTEMS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="bench_sft_"))
    try:
        model_dir, data_file = prepare_inputs(work, args.hidden_size, args.rows)
        gflops = matmul_gflops(args.threads)
        print(
            f"model {model_dir.name}, {args.rows} rows, batch {args.batch_size}, {args.steps} steps, "
            f"max_length {args.max_length}, {args.threads} threads, {args.repeats} repeats"
        )
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
        for repeat in range(args.repeats):
            for system in systems:
                result = run_child(system, model_dir, data_file, work, args)
                runs[system].append(result)
                print(
                    f"  run {repeat + 1}/{args.repeats} {system:13s} {result['tokens_per_second']:>9,.0f} tok/s "
                    f"({result['train_seconds']:.1f} s, loss {result['final_loss']:.3f}, "
                    f"RSS {result['peak_rss_mb']:.0f} MB, load {result['load_avg']})",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print("\n".join(summarize(runs, gflops, args.threads)))
    print()
    for system in systems:
        print(f"  {system}: {SYSTEMS[system]}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {list(SYSTEMS)}")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per system (the median is shown)")
    parser.add_argument("--hidden-size", type=int, default=64, help="64: 0.3M params; 256: a few M")
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=2.0e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=list(SYSTEMS), help="run one system in this process (what the parent calls)")
    parser.add_argument("--profile", action="store_true", help="with --only: print a cProfile of the training loop")
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile and not args.only:
        parser.error("--profile needs --only SYSTEM")
    return args


if __name__ == "__main__":
    cli = parse_args()
    child(cli) if cli.only else parent(cli)
