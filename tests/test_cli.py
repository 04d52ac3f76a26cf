"""The commands a user types, run as subprocesses: the README's first command, a typo, --dry-run, torchrun."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from conftest import free_port, run_command

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "self_model/fine_tuning/train_finetune.py"
CONFIG = "config/self_model_config/finetune.yaml"




def test_readme_first_command(embedded_model: str, tmp_path: Path) -> None:
    """The README's first command, with the output folder moved out of the checkout."""
    out = tmp_path / "finetune"
    result = run_command([sys.executable, SCRIPT, "--config", CONFIG, f"training_args.output_dir={out}"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"fine-tuned model saved to {out}/final" in result.stdout
    assert "\nQ: " in result.stdout and "\nA: " in result.stdout
    assert "needs a GPU; no CUDA device here, so this run trains in fp32" in result.stderr
    state = json.loads(max(out.glob("checkpoint-*/trainer_state.json")).read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert losses and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    # Running it again never overwrites the finished run.
    again = run_command([sys.executable, SCRIPT, "--config", CONFIG, f"training_args.output_dir={out}"])
    assert again.returncode != 0 and "holds a finished run" in again.stderr


def test_typo_in_yaml_is_named_with_its_fix(tmp_path: Path) -> None:
    config = tmp_path / "typo.yaml"
    text = (ROOT / CONFIG).read_text().replace("lora_alpha:", "lora_alpah:").replace("learning_rate:", "learnig_rate:")
    config.write_text(text)
    result = run_command([sys.executable, SCRIPT, "--config", str(config),
                          f"training_args.output_dir={tmp_path / 'o'}"])
    assert result.returncode == 2
    assert f"config error in {config}" in result.stderr
    assert "peft.lora_alpah: unknown key (did you mean 'lora_alpha'?)" in result.stderr
    assert "training_args.learnig_rate: unknown TrainingArguments argument (did you mean 'learning_rate'?)" in \
        result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_dry_run_prints_plan_and_marked_sample(embedded_model: str, tmp_path: Path) -> None:
    out = tmp_path / "dry"
    result = run_command([sys.executable, SCRIPT, "--config", CONFIG, "--dry-run", f"training_args.output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert "dry run: nothing is trained" in text and "trainable" in text and "samples per optimizer step" in text
    assert "<|im_start|>assistant\n[[" in text and "<|im_end|>]]" in text
    assert not out.exists()


def test_bad_data_exits_nonzero_with_file_and_line(embedded_model: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}\n'
                   '{"conversations": [{"from": "human", "value": "only a question"}]}\n')
    out = tmp_path / "run"
    result = run_command([sys.executable, SCRIPT, "--config", CONFIG, f"data.train_file={bad}",
                  f"training_args.output_dir={out}"])
    assert result.returncode != 0
    assert f"{bad}:2: the conversation does not end with an assistant turn" in result.stderr
    assert not (out / "final").exists()


def test_torchrun_two_processes(embedded_model: str, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    result = run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", free_port(),
                          SCRIPT, "--config", CONFIG, f"training_args.output_dir={out}", "training_args.max_steps=4",
                          "training_args.per_device_train_batch_size=2",
                          "training_args.gradient_accumulation_steps=1"],
                         timeout=900, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # Two processes each took a batch of 2 per step: the trainer saw twice the samples of one process.
    assert state["train_batch_size"] == 2
    assert result.stdout.count("fine-tuned model saved to") == 1  # only rank 0 reports
