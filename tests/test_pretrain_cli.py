"""Continued pretraining as a user types it: the README command, bad data, --dry-run, and ZeRO-2 on 2 processes."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, run_command

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "self_model/pretrain/train_pretrain.py"
CONFIG = "config/self_model_config/pretrain.yaml"
# DeepSpeed compiles its CPU communication op on first use (a minute or two); keep the build between runs.
TORCH_EXTENSIONS = Path.home() / ".cache" / "self_model" / "torch_extensions"




def test_readme_pretrain_command(embedded_model: str, tmp_path: Path) -> None:
    """The README's command, with the output folder and the cache moved out of the checkout and home."""
    out = tmp_path / "pretrain"
    result = run_command([sys.executable, SCRIPT, "--config", CONFIG, f"training_args.output_dir={out}",
                  f"data.cache_dir={tmp_path / 'cache'}"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"pretrained model saved to {out}/final" in result.stdout
    match = re.search(r"eval perplexity: ([\d.]+) at step 0 -> ([\d.]+) at step (\d+)", result.stdout)
    assert match and float(match[2]) < float(match[1]) and int(match[3]) > 0, result.stdout[-2000:]
    assert "60 blocks of 128; remainders padded: 1 block(s)" in result.stderr
    assert (out / "final" / "model.safetensors").is_file() and (out / "eval_results.json").is_file()
    state = json.loads(max(out.glob("checkpoint-*/trainer_state.json"), key=lambda p: p.stat().st_mtime).read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert losses and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_bad_corpus_exits_nonzero_naming_file_and_offset(pretrain_config: Any, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """In-process through run_main (the exit code path a user sees), to spare a subprocess start."""
    from self_model.core.cli import run_main
    from self_model.pretrain.config import PretrainConfig
    from self_model.pretrain.train_pretrain import main

    bad = tmp_path / "gbk.txt"
    bad.write_bytes("第一行没问题\n".encode() + "第二行是GBK编码\n".encode("gbk"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = pretrain_config()
    out = Path(cfg.training_args["output_dir"])
    with pytest.raises(SystemExit) as exited:
        run_main(main, PretrainConfig, "", ["--config", str(ROOT / CONFIG), f"data.train_file=[{bad}, {empty}]",
                                            f"data.eval_file={cfg.data.eval_file}",
                                            f"model_name_or_path={cfg.model_name_or_path}",
                                            f"tokenizer_name_or_path={cfg.model_name_or_path}",
                                            f"training_args.output_dir={out}", f"data.cache_dir={cfg.data.cache_dir}"])
    assert exited.value.code == 3
    err = capsys.readouterr().err
    offset = len("第一行没问题\n".encode())
    assert f"{bad}:2: byte offset {offset}: not valid UTF-8" in err
    assert f"{empty}: the file is empty" in err
    assert "Traceback" not in err and not out.exists()


def test_dry_run_prints_the_plan(pretrain_config: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from self_model.pretrain.train_pretrain import main

    cfg = pretrain_config()
    assert main(cfg, dry_run=True) is None
    text = capsys.readouterr().out
    assert "dry run: nothing is trained" in text and "7651 tokens -> 60 blocks of 128" in text
    assert "4 blocks per device x 1 accumulation x 1 process(es) = 512 tokens per optimizer step" in text
    assert not Path(cfg.training_args["output_dir"]).exists()


@pytest.mark.slow
def test_deepspeed_zero2_on_two_cpu_processes(embedded_model: str, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed", reason="needs the deepspeed extra: uv sync --extra deepspeed")
    out = tmp_path / "zero2"
    TORCH_EXTENSIONS.mkdir(parents=True, exist_ok=True)
    result = run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", free_port(),
                          SCRIPT, "--config", CONFIG,
                          "--deepspeed", "config/self_model_config/deepspeed/ds_zero2.json",
                          f"training_args.output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}",
                          "training_args.max_steps=4", "training_args.save_steps=4", "training_args.eval_steps=4",
                          "training_args.logging_steps=1"],
                         timeout=900, OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(TORCH_EXTENSIONS))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("pretrained model saved to") == 1  # only rank 0 reports
    assert (out / "final" / "model.safetensors").is_file()
    # A DeepSpeed checkpoint with the optimizer state partitioned over both ranks (ZeRO).
    shards = sorted(p.name for p in (out / "checkpoint-4" / "global_step4").glob("*optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert state["global_step"] == 4 and len(losses) == 4 and all(math.isfinite(x) for x in losses)
    evals = json.loads((out / "eval_results.json").read_text())
    assert [e["step"] for e in evals] == [0, 4] and evals[1]["eval_perplexity"] < evals[0]["eval_perplexity"]
