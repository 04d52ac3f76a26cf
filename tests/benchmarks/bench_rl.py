"""DPO and GRPO speed and memory: our stages against plain TRL with the same model, data and settings.

    uv run python tests/benchmarks/bench_rl.py --algo dpo --shape tiny        # ~5 min on 2 idle cores
    uv run python tests/benchmarks/bench_rl.py --algo grpo --shape mid
    uv run python tests/benchmarks/bench_rl.py --algo both --shape tiny --rounds 1 --steps 2   # smoke test

Not a test: nothing is asserted. Our DPO and GRPO stages run on trl's trainers (DPOTrainer on pre-tokenized rows,
GRPOTrainer with our rewards), so this measures what our layer costs or saves against trl used directly:

    ours_dpo    train_dpo.main(cfg): new LoRA r=8 on q/k/v/o of the base, the reference is the base (adapter off)
    trl_dpo     trl.DPOTrainer with the same pairs (read by our loader, so the rows are identical), the same
                LoRA (peft_config: trl's reference is the base with the adapter off too), beta, loss, batch, steps
    ours_grpo   train_grpo.main(cfg), backend trl: normalized_match + 0.5 x length_penalty, 4 replies a prompt
    trl_grpo    trl.GRPOTrainer with the same prompts, the same two reward functions (our functions, called
                directly), generations, completion length, batch sizes, KL coefficient and LoRA

Every setting is in `settings()`; fp32, gradient checkpointing off everywhere, `--threads` CPU threads.
Each run is a fresh subprocess; rounds interleave with a rotating order. Measured between on_train_begin and
on_train_end (the same probe as bench_sft.py, timing only): seconds per optimizer step, pairs/s (DPO) or
completions/s (GRPO), peak RSS, and the other processes' CPU use while it ran ("foreign cores").
Results: the table on stdout and JSON in tests/benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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
    machine,
    make_probe_callback,
    spread,
    write_json,
)

SYSTEMS = {"dpo": ["ours_dpo", "trl_dpo"], "grpo": ["ours_grpo", "trl_grpo"]}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"dpo": {"batch": 4, "max_length": 512, "beta": 0.1, "loss_type": "sigmoid", "learning_rate": 5.0e-5},
            "grpo": {"prompts_per_step": 8, "generations": 4, "micro_batch": 4, "max_completion": 32,
                     "max_prompt": 256, "learning_rate": 1.0e-5, "kl": 0.001, "rewards": ["normalized_match",
                                                                                           "length_penalty"],
                     "weights": [1.0, 0.5]},
            "steps": args.steps, "seed": 42, "threads": args.threads}


def data_files() -> dict[str, Path]:
    dpo, grpo = SHARED_DATA / "dpo_zh_500.jsonl", SHARED_DATA / "grpo_sample.jsonl"
    return {"dpo": dpo if dpo.exists() else SAMPLE_DATA / "dpo_train.jsonl",
            "grpo": grpo if grpo.exists() else SAMPLE_DATA / "grpo_train.jsonl"}


def common_args(out: Path, s: dict[str, Any]) -> dict[str, Any]:
    return {"output_dir": str(out), "max_steps": s["steps"], "seed": s["seed"], "logging_steps": 1,
            "save_strategy": "no", "bf16": False, "fp16": False, "use_cpu": True, "disable_tqdm": True,
            "dataloader_num_workers": 0, "gradient_checkpointing": False, "report_to": []}


# ---- children ---------------------------------------------------------------------------------------------------
def instrument(module: Any, builder: str, probe: Any) -> None:
    """Add the probe to the trainer the stage builds (its entry point otherwise unchanged)."""
    build = getattr(module, builder)

    def instrumented(*a: Any, **k: Any) -> Any:
        built = build(*a, **k)
        trainer = built[0] if isinstance(built, tuple) else built
        trainer.add_callback(probe)
        return built

    setattr(module, builder, instrumented)


def run_ours_dpo(args: argparse.Namespace, s: dict[str, Any], out: Path, probe: Any) -> None:
    import self_model.rlhf.train_dpo as entry
    from self_model.core.config import load_config
    from self_model.rlhf.config import DPOStageConfig

    d = s["dpo"]
    training = common_args(out, s)
    training.pop("report_to")
    training.update(per_device_train_batch_size=d["batch"], learning_rate=d["learning_rate"])
    data = {"model_name_or_path": str(args.model), "tokenizer_name_or_path": str(args.model),
            "adapter_name_or_path": None, "template_path": str(TEMPLATE),
            "data": {"train_file": str(args.data), "eval_file": None, "max_length": d["max_length"]},
            "beta": d["beta"], "loss_type": d["loss_type"],
            "peft": {"enabled": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                     "target_modules": LORA_TARGETS},
            "training_args": training}
    instrument(entry, "build_dpo_trainer", probe)
    entry.main(load_config(DPOStageConfig, None, [], data=data))


def run_trl_dpo(args: argparse.Namespace, s: dict[str, Any], out: Path, probe: Any) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from self_model.core.preferences import load_preference_pairs

    d = s["dpo"]
    pairs, _ = load_preference_pairs(str(args.data))
    rows = [{"prompt": p["prompt"], "chosen": [p["chosen"]], "rejected": [p["rejected"]]} for p in pairs]
    config = DPOConfig(**common_args(out, s), per_device_train_batch_size=d["batch"], learning_rate=d["learning_rate"],
                       max_length=d["max_length"], beta=d["beta"], loss_type=d["loss_type"])
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
               processing_class=AutoTokenizer.from_pretrained(args.model), peft_config=lora,
               callbacks=[probe]).train()


def run_ours_grpo(args: argparse.Namespace, s: dict[str, Any], out: Path, probe: Any) -> None:
    import self_model.rlhf.train_grpo as entry
    from self_model.core.config import load_config
    from self_model.rlhf.config import GRPOStageConfig

    g = s["grpo"]
    data = {"model_name_or_path": str(args.model), "tokenizer_name_or_path": str(args.model),
            "adapter_name_or_path": None, "template_path": str(TEMPLATE),
            "peft": {"enabled": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                     "target_modules": LORA_TARGETS},
            "ppo": {"backend": "trl", "output_dir": str(out), "train_file": str(args.data), "eval_file": None,
                    "max_prompt_length": g["max_prompt"], "prompt_truncation": "drop",
                    "max_response_length": g["max_completion"], "rollout_n": g["generations"],
                    "train_batch_size": g["prompts_per_step"], "ppo_mini_batch_size": g["prompts_per_step"],
                    "ppo_micro_batch_size_per_gpu": g["micro_batch"], "actor_lr": g["learning_rate"],
                    "use_kl_loss": True, "kl_loss_coef": g["kl"], "total_training_steps": s["steps"],
                    "reward": {"functions": g["rewards"], "weights": g["weights"]},
                    "trl_args": {"logging_steps": 1, "save_strategy": "no", "seed": s["seed"], "temperature": 1.0,
                                 "disable_tqdm": True, "dataloader_num_workers": 0}}}
    instrument(entry, "build_grpo_trainer", probe)
    entry.main(load_config(GRPOStageConfig, None, [], data=data))


def run_trl_grpo(args: argparse.Namespace, s: dict[str, Any], out: Path, probe: Any) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from self_model.core.prompt_rows import load_prompts
    from self_model.rlhf.ppo_grpo import rewards

    g = s["grpo"]
    rows = [{"prompt": r["messages"], "ground_truth": r["ground_truth"]} for r in load_prompts(str(args.data))]

    def normalized_match(completions: list[Any], ground_truth: list[str], **_: Any) -> list[float]:
        return [rewards.normalized_match("bench", c[-1]["content"], t) for c, t in zip(completions, ground_truth)]

    def length_penalty(completions: list[Any], ground_truth: list[str], **_: Any) -> list[float]:
        return [rewards.length_penalty("bench", c[-1]["content"], t) for c, t in zip(completions, ground_truth)]

    per_step = g["prompts_per_step"] * g["generations"]
    config = GRPOConfig(**common_args(out, s), learning_rate=g["learning_rate"], lr_scheduler_type="constant",
                        num_generations=g["generations"], max_completion_length=g["max_completion"], beta=g["kl"],
                        per_device_train_batch_size=g["micro_batch"],
                        gradient_accumulation_steps=per_step // g["micro_batch"],
                        steps_per_generation=per_step // g["micro_batch"], reward_weights=g["weights"],
                        temperature=1.0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    GRPOTrainer(model=model, reward_funcs=[normalized_match, length_penalty], args=config,
                train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(args.model),
                peft_config=lora, callbacks=[probe]).train()


RUNNERS = {"ours_dpo": run_ours_dpo, "trl_dpo": run_trl_dpo, "ours_grpo": run_ours_grpo, "trl_grpo": run_trl_grpo}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    s = json.loads(args.settings)
    probe = make_probe_callback(count_tokens=False)
    out = Path(tempfile.mkdtemp(prefix=f"bench_rl_{args.only}_"))
    try:
        RUNNERS[args.only](args, s, out / "run", probe)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    result = probe.result()
    metrics = [e for e in probe.state.log_history if "loss" in e]
    result["last_logged"] = {k: v for k, v in (metrics[-1] if metrics else {}).items()
                             if k in ("loss", "reward", "rewards/chosen", "rewards/margins", "kl",
                                      "completions/mean_length")}
    args.result.write_text(json.dumps(result), encoding="utf-8")


# ---- parent -----------------------------------------------------------------------------------------------------
def parent(args: argparse.Namespace) -> None:
    algos = ["dpo", "grpo"] if args.algo == "both" else [args.algo]
    s = settings(args)
    files = data_files()
    work = Path(tempfile.mkdtemp(prefix="bench_rl_"))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    payload: dict[str, Any] = {"benchmark": "rl", "shape": args.shape, "settings": s, "machine": machine(),
                               "data": {k: str(v) for k, v in files.items()}}
    try:
        model = build_model_dir(work / f"model_{args.shape}", args.shape)
        for algo in algos:
            systems = SYSTEMS[algo]
            runs: dict[str, list[dict[str, Any]]] = {x: [] for x in systems}
            with ForeignLoad() as load:
                for round_ in range(args.rounds):
                    for system in systems[round_ % 2:] + systems[:round_ % 2]:
                        result_file = work / f"{system}.json"
                        cmd = [sys.executable, __file__, "--only", system, "--model", str(model), "--data",
                               str(files[algo]), "--result", str(result_file), "--settings", json.dumps(s),
                               "--threads", str(args.threads)]
                        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work)
                        if proc.returncode != 0 or not result_file.exists():
                            log = (proc.stdout + proc.stderr)[-5000:]
                            sys.exit(f"{system} failed (exit {proc.returncode}):\n{log}")
                        r = json.loads(result_file.read_text(encoding="utf-8"))
                        r.update(load.window(*r.pop("train_window")))
                        runs[system].append(r)
                        print(f"  round {round_ + 1}/{args.rounds} {system:10s} {r['seconds_per_step']:.2f} s/step, "
                              f"RSS {r['peak_rss_mb']:.0f} MB, foreign cores {r['foreign_cores']}, "
                              f"last {r['last_logged']}", flush=True)
            unit = s["dpo"]["batch"] if algo == "dpo" else s["grpo"]["prompts_per_step"] * s["grpo"]["generations"]
            name = "pairs/s" if algo == "dpo" else "completions/s"
            print(f"\n| {algo} system | s/step (median) | min-max | {name} | x trl | peak RSS MB | foreign cores |")
            print("|---|---|---|---|---|---|---|")
            med = {x: statistics.median(r["seconds_per_step"] for r in rs) for x, rs in runs.items()}
            base = med[systems[1]]
            for system, rs in runs.items():
                sp = [r["seconds_per_step"] for r in rs]
                foreign = [r["foreign_cores"] for r in rs if r["foreign_cores"] is not None]
                print(f"| {system} | {med[system]:.2f} | {min(sp):.2f}-{max(sp):.2f} | {unit / med[system]:.2f} "
                      f"| {base / med[system]:.2f} | {statistics.median(r['peak_rss_mb'] for r in rs):,.0f} "
                      f"| {min(foreign, default=0):.2f}-{max(foreign, default=0):.2f} |")
            payload[algo] = {"runs": runs, "summary": {x: {"seconds_per_step": spread([r["seconds_per_step"]
                                                                                     for r in rs])}
                                                       for x, rs in runs.items()}}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = write_json(args.json or RESULTS / f"rl_{args.algo}_{args.shape}_{time.strftime('%Y%m%d_%H%M')}.json",
                      payload)
    print(f"\nJSON: {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", default="both", choices=["dpo", "grpo", "both"])
    parser.add_argument("--shape", default="tiny", choices=["tiny", "mid"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", choices=list(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    cli = parse_args()
    child(cli) if cli.only else parent(cli)
