"""SFT speed and memory: our SFT stage against LLaMA-Factory and TRL on the same model, data and settings.

    uv run python tests/benchmarks/bench_sft.py --shape tiny                       # ~10 min on 2 idle cores
    uv run python tests/benchmarks/bench_sft.py --shape mid                        # hidden 512, 8 layers
    uv run python tests/benchmarks/bench_sft.py --shape qwen0.5b --layers 4 --steps 5   # Qwen2.5-0.5B proportions
    uv run python tests/benchmarks/bench_sft.py --shape tiny --rounds 1 --steps 4 --rows 64   # smoke test
    uv run python tests/benchmarks/bench_sft.py --shape qwen0.5b --layers 4 --only ours_packed --profile

Not a test (pytest collects test_*.py only): speed is measured here, never asserted. Each system trains the
same random Qwen2 of the chosen shape (SHAPES in bench_common.py) on the same rows of
../shared/data/medicalgpt/medical_sft_1K_format.jsonl (the shipped sample data repeated when that folder is
absent) with LoRA r=8 / alpha 16 / dropout 0.05 on q/k/v/o, the same batch size, steps, max_length, learning
rate (cosine), seed, fp32, on `--threads` CPU threads:

    ours              our SFT entry point `train_finetune.main(cfg)`, data.packing: false
    ours_packed       the same, data.packing: true (documents kept apart)
    lf                LLaMA-Factory (pinned, installed by this script into its own venv), no packing
    lf_neat_packing   LLaMA-Factory neat_packing (its leak-free packing: block-diagonal attention)
    trl_tuned         TRL SFTTrainer tuned as its docs suggest: no gradient checkpointing, prompt/completion
                      rows, completion-only loss (TRL's default loss also trains the prompt)
    trl_packed        trl_tuned + packing with BFD, which is padding-free (documents kept apart)
    trl_defaults      TRL as a user first writes it (messages rows, gradient checkpointing, loss on prompt too)

The tokenizer carries our qwen2_chatml template as its chat_template and LLaMA-Factory uses its `qwen`
template, which renders the same text (same default system prompt). Each run is a fresh subprocess (its own
imports, peak RSS); rounds are interleaved and their order rotates, so machine noise hits every system alike.
Every system is measured by the same probe (bench_common.make_probe_callback), outside its trainer:
non-padding tokens are counted from the rows handed to the collator, over the optimizer steps taken, divided by
the wall time from on_train_begin to on_train_end (loading and tokenization excluded). While each child runs,
the parent samples every other process's CPU time (`foreign cores`: how many cores other work kept busy) and
the load average: a run with foreign cores above ~0.2 on 2 cores was measured under contention.

Learned-loss check: `--pretrain-steps N` first trains the random model fully for N steps on the same rows (our
SFT stage, packed), so every system starts from a model that has learned something and its LoRA loss moves; the
loss curves are printed side by side. Results: the table on stdout and JSON in tests/benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    RESULTS,
    ROOT,
    SAMPLE_DATA,
    SHARED_DATA,
    TEMPLATE,
    ForeignLoad,
    build_model_dir,
    executed_flops_per_token,
    machine,
    make_probe_callback,
    matmul_gflops,
    profile_breakdown,
    spread,
    write_json,
)

LF_VERSION = "0.9.5"  # LLaMA-Factory, from PyPI
LF_VENV = Path(os.environ.get("SELF_MODEL_BENCH_CACHE", Path.home() / ".cache" / "self_model" / "bench")) / \
    f"llamafactory-{LF_VERSION}-venv"
SYSTEMS = {
    "ours": "self_model SFT, data.packing: false",
    "ours_packed": "self_model SFT, data.packing: true (documents kept apart)",
    "lf": f"LLaMA-Factory {LF_VERSION}, no packing",
    "lf_neat_packing": f"LLaMA-Factory {LF_VERSION} neat_packing (documents kept apart)",
    "trl_tuned": "TRL SFTTrainer: no gradient checkpointing, prompt/completion rows, completion-only loss",
    "trl_packed": "trl_tuned + BFD packing (padding-free: documents kept apart)",
    "trl_defaults": "TRL as a user writes it: messages rows, gradient checkpointing, loss on prompt + reply (fp32)",
}
DEFAULT_SYSTEMS = "ours,ours_packed,lf,lf_neat_packing,trl_tuned,trl_packed"
# Which systems compute the LM head only at trained positions (for the executed-FLOPs count).
HEAD_AT_TRAINED_ONLY = {"ours", "ours_packed"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ROLE_OF = {"human": "user", "gpt": "assistant", "system": "system"}


# ---- inputs -------------------------------------------------------------------------------------------------------
def write_rows(work: Path, rows: int) -> Path:
    source = SHARED_DATA / "medical_sft_1K_format.jsonl"
    if source.exists():
        lines = source.read_text(encoding="utf-8").splitlines()[:rows]
    else:
        print(f"note: {source} is absent; repeating the shipped sample data instead", file=sys.stderr)
        sample = [line for line in (SAMPLE_DATA / "sft_train.jsonl").read_text(encoding="utf-8").splitlines()
                  if line.strip()]
        lines = (sample * (rows // len(sample) + 1))[:rows]
    data_file = work / "sft_rows.jsonl"
    data_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # LLaMA-Factory reads data sets through a dataset_info.json beside them (its sharegpt defaults: from / value,
    # human / gpt): the same file.
    info = {"bench": {"file_name": data_file.name, "formatting": "sharegpt", "columns": {"messages": "conversations"}}}
    (work / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return data_file


def pretrain(model_dir: Path, data_file: Path, work: Path, steps: int, threads: int) -> Path:
    """Full fine-tuning for `steps` steps on the same rows (our SFT stage, packed): a start whose LoRA losses move."""
    out = work / "pretrained"
    env = child_env(threads)
    code = (
        "import sys; from self_model.core.config import load_config; "
        "from self_model.fine_tuning.config import FinetuneConfig; import self_model.fine_tuning.train_finetune as e; "
        "import json; e.main(load_config(FinetuneConfig, None, [], data=json.loads(sys.argv[1])))"
    )
    data = {"model_name_or_path": str(model_dir), "tokenizer_name_or_path": str(model_dir),
            "template_path": str(TEMPLATE), "data": {"train_file": str(data_file), "max_length": 512, "packing": True},
            "peft": {"enabled": False},
            "training_args": {"output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": 8,
                              "learning_rate": 1.0e-3, "lr_scheduler_type": "constant", "save_strategy": "no",
                              "logging_steps": max(steps // 5, 1), "disable_tqdm": True, "seed": 0}}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(data)], env=env, capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"pretraining failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    losses = [json.loads(line).get("loss") for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x for x in losses if x is not None]
    print(f"pretrained {steps} steps (full weights) in {time.perf_counter() - start:.0f} s: loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}")
    return out / "final"


def ensure_llamafactory() -> Path:
    """LLaMA-Factory's own venv (outside the repository), created once with uv from PyPI."""
    python = LF_VENV / "bin" / "python"
    if python.exists():
        return python
    import torch

    print(f"installing llamafactory=={LF_VERSION} into {LF_VENV} (once)...", flush=True)
    LF_VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["uv", "venv", "--python", f"{sys.version_info.major}.{sys.version_info.minor}", str(LF_VENV)],
                   check=True)
    torch_version = torch.__version__.split("+")[0]  # the same torch as ours: the comparison is about the trainers
    subprocess.run(["uv", "pip", "install", "--python", str(python), f"llamafactory=={LF_VERSION}",
                    f"torch=={torch_version}"], check=True)
    return python


# ---- the children: one system, one run, in this process -------------------------------------------------------
def common_args(output_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Training arguments every system shares (TrainingArguments field names). On a CPU: fp32 (no bf16 units);
    with --device cuda: bf16 (the GPU script)."""
    gpu = args.device == "cuda"
    values = {"output_dir": str(output_dir), "per_device_train_batch_size": args.batch_size,
              "gradient_accumulation_steps": 1, "max_steps": args.steps, "learning_rate": args.learning_rate,
              "lr_scheduler_type": "cosine", "seed": 42, "logging_steps": args.logging_steps, "save_strategy": "no",
              "bf16": gpu, "fp16": False, "use_cpu": not gpu, "disable_tqdm": True, "dataloader_num_workers": 0,
              "gradient_checkpointing": args.gradient_checkpointing, "report_to": []}
    if args.liger:
        values["use_liger_kernel"] = True
    return values


def run_ours(system: str, args: argparse.Namespace, out: Path, probe: Any) -> None:
    """Our SFT entry point, unchanged: main(cfg) with the probe added to the trainer it builds."""
    import self_model.fine_tuning.train_finetune as entry
    from self_model.core.config import load_config
    from self_model.fine_tuning.config import FinetuneConfig

    training = common_args(out, args)
    training.pop("report_to")
    data = {"model_name_or_path": str(args.model), "tokenizer_name_or_path": str(args.model),
            "template_path": str(TEMPLATE),
            "data": {"train_file": str(args.data), "max_length": args.max_length, "packing": system == "ours_packed"},
            "peft": {"enabled": not args.full, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                     "target_modules": LORA_TARGETS},
            "training_args": training}
    cfg = load_config(FinetuneConfig, None, [], data=data)
    build = entry.build_sft_trainer

    def instrumented(*a: Any, **k: Any) -> Any:
        trainer = build(*a, **k)
        trainer.add_callback(probe)
        return trainer

    entry.build_sft_trainer = instrumented
    entry.chat = lambda *a, **k: ""  # the closing sample answer is not training
    entry.main(cfg)


def trl_rows(data_file: Path, prompt_completion: bool) -> Any:
    from datasets import Dataset

    rows = []
    for line in data_file.read_text(encoding="utf-8").splitlines():
        turns = [{"role": ROLE_OF[t["from"]], "content": t["value"]} for t in json.loads(line)["conversations"]]
        rows.append({"prompt": turns[:-1], "completion": turns[-1:]} if prompt_completion else {"messages": turns})
    return Dataset.from_list(rows)


def run_trl(system: str, args: argparse.Namespace, out: Path, probe: Any) -> None:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tuned = system != "trl_defaults"
    extra: dict[str, Any] = {"max_length": args.max_length}
    if tuned:
        extra.update(completion_only_loss=True)
    else:
        extra.update(gradient_checkpointing=True)
    if system == "trl_packed":
        extra.update(packing=True, packing_strategy="bfd")  # bfd is padding-free: documents kept apart
    config = SFTConfig(**{**common_args(out, args), **extra})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if config.bf16 else torch.float32)
    lora = None if args.full else LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS,
                                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=trl_rows(args.data, prompt_completion=tuned),
                         processing_class=AutoTokenizer.from_pretrained(args.model), peft_config=lora,
                         callbacks=[probe])
    trainer.train()


def run_llamafactory(system: str, args: argparse.Namespace, out: Path, probe: Any) -> None:
    """LLaMA-Factory's own entry (`run_exp`, what `llamafactory-cli train` calls) with the probe as a callback."""
    from llamafactory.train.tuner import run_exp

    train = common_args(out, args)
    train.pop("report_to")
    # LLaMA-Factory turns gradient checkpointing on by default and has its own switches for it and for Liger.
    checkpointing, liger = train.pop("gradient_checkpointing"), train.pop("use_liger_kernel", False)
    lf_args = {
        "stage": "sft", "do_train": True, "model_name_or_path": str(args.model), "template": "qwen",
        "dataset": "bench", "dataset_dir": str(args.data.parent), "cutoff_len": args.max_length,
        "overwrite_cache": True, "finetuning_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.05,
        "lora_target": ",".join(LORA_TARGETS), "report_to": "none", "plot_loss": False,
        "neat_packing": system == "lf_neat_packing", "disable_gradient_checkpointing": not checkpointing,
        "enable_liger_kernel": liger, **train,
    }
    run_exp(lf_args, callbacks=[probe])


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    probe = make_probe_callback(profile=args.profile)
    out = Path(tempfile.mkdtemp(prefix=f"bench_sft_{args.only}_"))
    try:
        runner = run_ours if args.only.startswith("ours") else run_trl if args.only.startswith("trl") \
            else run_llamafactory
        runner(args.only, args, out / "run", probe)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    result = probe.result(skip=args.warmup_steps)
    if probe.profiler:
        print(f"\n=== torch profiler, {args.only}: training loop only, operators by own CPU time ===")
        print(probe.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        print(f"=== where the time goes, {args.only} (bench_common.profile_breakdown) ===")
        for bucket, seconds, share in profile_breakdown(probe.profiler, result["vocab"]):
            print(f"{bucket:<20} {seconds:8.2f} s  {100 * share:5.1f}%")
    if args.result:
        args.result.write_text(json.dumps(result), encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "loss_curve"}))


# ---- the parent: interleaved rounds, one subprocess each, the table and the JSON ---------------------------------
def child_env(threads: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                DISABLE_VERSION_CHECK="1", PYTHONPATH=str(ROOT))


def run_child(system: str, python: Path, args: argparse.Namespace, work: Path, load: ForeignLoad) -> dict[str, Any]:
    result_file = work / f"{system}.json"
    cmd = [str(python), __file__, "--only", system, "--model", str(args.model), "--data", str(args.data),
           "--result", str(result_file), "--threads", str(args.threads), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
           "--learning-rate", str(args.learning_rate), "--logging-steps", str(args.logging_steps),
           "--device", args.device, "--warmup-steps", str(args.warmup_steps)]
    for flag in ("full", "gradient_checkpointing", "liger"):
        cmd += [f"--{flag.replace('_', '-')}"] * getattr(args, flag)
    env = child_env(args.threads)
    if system.startswith("lf"):
        env.pop("PYTHONPATH")  # LLaMA-Factory's venv: none of this project's packages
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work)
    if proc.returncode != 0 or not result_file.exists():
        sys.exit(f"{system} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-5000:]}")
    result = json.loads(result_file.read_text(encoding="utf-8"))
    result_file.unlink()
    result.update(load.window(*result.pop("train_window")))
    return result


PACKED_ROWS = {"lf_neat_packing", "trl_packed"}  # rows of several samples: another mix of samples per step


def check_masks(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The loss masks are comparable: the share of non-padding tokens that are trained, per system, over the
    steps taken. Systems fed one sample per row see the same samples in the same order (the same seeded
    sampler): their shares may differ only by the one newline LLaMA-Factory and TRL also train after
    <|im_end|> (within 2%). LLaMA-Factory's and TRL's packed rows hold other samples per step, so only a gross
    difference (over 5%) is flagged there."""
    notes = []
    share = {s: sum(r["trained_tokens"] for r in rs) / max(sum(r["tokens"] for r in rs), 1)
             for s, rs in runs.items()}
    ref = share.get("ours", share.get("ours_packed", next(iter(share.values()))))
    for system, value in share.items():
        if system == "trl_defaults":
            continue  # trains the prompt too, by design
        if abs(value - ref) > (0.05 if system in PACKED_ROWS else 0.02):
            notes.append(f"WARNING: {system} trains {100 * value:.1f}% of its tokens against ours {100 * ref:.1f}%: "
                         "the loss masks differ")
    return notes


def summarize(runs: dict[str, list[dict[str, Any]]], gflops: float) -> tuple[list[str], dict[str, Any]]:
    med = {s: spread([r["tokens_per_second"] for r in rs]) for s, rs in runs.items()}

    def ratio(system: str, base: str) -> str:
        return f"{med[system]['median'] / med[base]['median']:.2f}" if med.get(base, {}).get("median") else "-"

    lines = ["| system | non-pad tok/s (median) | min-max | x lf | x lf_neat | x trl_tuned | x trl_packed "
             "| tok/step (padded) | trained share | peak RSS MB | foreign cores | util 6N | util executed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary: dict[str, Any] = {}
    for system, rs in runs.items():
        first = rs[0]
        first["head_share"] = first["trained_tokens"] / max(first["tokens"], 1) if system in HEAD_AT_TRAINED_ONLY \
            else 1.0
        tps = med[system]["median"]
        util_6n = tps * 6 * first["params"] / (gflops * 1e9)
        util_exec = tps * executed_flops_per_token(first, lora=True) / (gflops * 1e9)
        rss = spread([r["peak_rss_mb"] for r in rs])
        foreign = [r["foreign_cores"] for r in rs if r.get("foreign_cores") is not None]
        lines.append(
            f"| {system} | {tps:,.0f} | {med[system]['min']:,.0f}-{med[system]['max']:,.0f} | {ratio(system, 'lf')} "
            f"| {ratio(system, 'lf_neat_packing')} | {ratio(system, 'trl_tuned')} | {ratio(system, 'trl_packed')} "
            f"| {first['tokens_per_step']:,.0f} ({first['padded_per_step']:,.0f}) "
            f"| {100 * first['trained_tokens'] / max(first['tokens'], 1):.1f}% | {rss['median']:,.0f} "
            f"| {min(foreign, default=0):.2f}-{max(foreign, default=0):.2f} | {100 * util_6n:.0f}% "
            f"| {100 * util_exec:.0f}% |")
        summary[system] = {"tokens_per_second": med[system], "peak_rss_mb": rss, "util_6n": util_6n,
                           "util_executed": util_exec, "foreign_cores": foreign}
    return lines, summary


def loss_curves(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """First round's loss at each logged step, per system, and each system's largest gap to ours."""
    curves = {s: dict(map(tuple, rs[0]["loss_curve"])) for s, rs in runs.items()}
    steps = sorted({step for c in curves.values() for step in c})
    lines = ["| step | " + " | ".join(curves) + " |", "|---" * (len(curves) + 1) + "|"]
    for step in steps:
        lines.append(f"| {step} | " + " | ".join(f"{c[step]:.3f}" if step in c else "-" for c in curves.values())
                     + " |")
    if "ours" in curves:
        for system, c in curves.items():
            common = [s for s in steps if s in c and s in curves["ours"]]
            if common and system != "ours":
                gap = max(abs(c[s] - curves["ours"][s]) for s in common)
                lines.append(f"largest gap to ours: {system} {gap:.3f}")
    return lines


def parent(args: argparse.Namespace) -> None:
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        sys.exit(f"--systems: unknown {unknown}; known: {list(SYSTEMS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pythons = {s: Path(sys.executable) for s in systems}
    if any(s.startswith("lf") for s in systems):
        lf_python = args.lf_python or ensure_llamafactory()
        pythons.update({s: lf_python for s in systems if s.startswith("lf")})
    work = Path(tempfile.mkdtemp(prefix="bench_sft_"))
    started = machine()
    try:
        args.data = write_rows(work, args.rows)
        if args.model_cache and (args.model_cache / "config.json").exists():
            args.model = args.model_cache  # built by an earlier call with the same shape (the GPU script)
        else:
            args.model = build_model_dir(args.model_cache or work / f"model_{args.shape}", args.shape, args.layers)
        if args.pretrain_steps:
            args.model = pretrain(args.model, args.data, work, args.pretrain_steps, args.threads)
        gflops = matmul_gflops(args.threads)
        depth = args.layers or __import__("bench_common").SHAPES[args.shape]["layers"]
        print(f"shape {args.shape} ({depth} layers), {args.rows} rows, batch {args.batch_size}, {args.steps} steps, "
              f"max_length {args.max_length}, {args.threads} threads, {args.rounds} rounds; "
              f"fp32 matmul {gflops:.0f} GFLOP/s", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
        with ForeignLoad() as load:
            for round_ in range(args.rounds):
                order = systems[round_ % len(systems):] + systems[:round_ % len(systems)]  # rotate the order
                for system in order:
                    r = run_child(system, pythons[system], args, work, load)
                    r["round"] = round_ + 1
                    runs[system].append(r)
                    print(f"  round {round_ + 1}/{args.rounds} {system:15s} {r['tokens_per_second']:>9,.1f} tok/s "
                          f"(steady {r['steady_tokens_per_second']:,.1f}) "
                          f"({r['train_seconds']:.1f} s, loss {r['final_loss']}, RSS {r['peak_rss_mb']:.0f} MB, "
                          f"foreign cores {r['foreign_cores']}, load {r['loadavg']})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table, summary = summarize(runs, gflops)
    print()
    print("\n".join(table))
    print("\nloss curves (round 1):")
    print("\n".join(loss_curves(runs)))
    notes = check_masks(runs)
    print("\n".join(notes) if notes else "\nloss masks: every system trains the same share of tokens (within 2%)")
    print("\nutil 6N = tok/s x 6 x params / matmul rate (the issue's definition; overstates LoRA's work); "
          "util executed = the FLOPs really run (bench_common.executed_flops_per_token) / matmul rate.")
    for system in systems:
        print(f"  {system}: {SYSTEMS[system]}")
    payload = {"benchmark": "sft", "shape": args.shape, "layers": depth, "settings": vars(args) | {
        "model": None, "data": None, "result": None, "lf_python": str(args.lf_python or "")},
        "machine": started, "matmul_gflops": gflops, "summary": summary, "runs": runs,
        "mask_notes": notes, "versions": versions(pythons)}
    path = write_json(args.json or RESULTS / f"sft_{args.shape}_{time.strftime('%Y%m%d_%H%M')}.json", payload)
    print(f"\nJSON: {path}")


def versions(pythons: dict[str, Path]) -> dict[str, str]:
    from importlib.metadata import version

    found = {name: version(name) for name in ("torch", "transformers", "peft", "trl")}
    lf = next((p for s, p in pythons.items() if s.startswith("lf")), None)
    if lf:
        out = subprocess.run([str(lf), "-c", "from importlib.metadata import version as v; print(v('llamafactory'), "
                              "v('transformers'), v('peft'))"], capture_output=True, text=True)
        found["llamafactory (its venv: llamafactory transformers peft)"] = out.stdout.strip()
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=["tiny", "mid", "qwen0.5b", "qwen1.5b"])
    parser.add_argument("--layers", type=int, help="fewer layers than the shape's (say so when reporting)")
    parser.add_argument("--systems", default=DEFAULT_SYSTEMS, help=f"comma-separated, from {list(SYSTEMS)}")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved runs per system (medians shown)")
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=2.0e-4)
    parser.add_argument("--logging-steps", type=int, default=5)
    parser.add_argument("--pretrain-steps", type=int, default=0,
                        help="full training steps before the benchmark so losses move (learned-loss check)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: bf16 (the GPU script)")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA (ours and TRL)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--liger", action="store_true", help="use_liger_kernel (needs liger-kernel installed)")
    parser.add_argument("--warmup-steps", type=int, default=0,
                        help="leave the first N steps out of the steady-state rate (GPU warm-up)")
    parser.add_argument("--json", type=Path, help="where to write the results (default tests/benchmarks/results/)")
    parser.add_argument("--lf-python", type=Path, help="an existing LLaMA-Factory venv's python")
    parser.add_argument("--model-cache", type=Path, help="build the random model here once and reuse it")
    parser.add_argument("--only", choices=list(SYSTEMS), help="run one system in this process (what the parent calls)")
    parser.add_argument("--profile", action="store_true",
                        help="with --only: print torch's profile of the training loop")
    parser.add_argument("--model", type=Path, help="with --only: the model folder")
    parser.add_argument("--data", type=Path, help="with --only: the rows (sharegpt JSON lines)")
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only and (args.model is None or args.data is None):
        parser.error("--only needs --model and --data (the parent passes them)")
    if args.profile and not args.only:
        parser.error("--profile needs --only SYSTEM")
    return args


if __name__ == "__main__":
    cli = parse_args()
    child(cli) if cli.only else parent(cli)
