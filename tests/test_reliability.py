"""Reliability (issue 16): interrupted, diverging and misconfigured runs lose nothing and say why.

- an incomplete checkpoint (killed while being written) is never resumed from;
- SIGTERM / SIGINT save a checkpoint and exit non-zero with the resume command;
- a non-finite loss or gradient norm stops the run at that step, keeping the last good checkpoint;
- preflight refuses known-bad combinations before any weights load.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from self_model.core.errors import UserError
from self_model.core.run import prepare_output_dir

ROOT = Path(__file__).resolve().parents[1]


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {e["step"]: e["loss"] for e in rows if "loss" in e}


# ---- interruptions ---------------------------------------------------------------------------------------
def _checkpoint(out: Path, step: int, complete: bool) -> Path:
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"partial")
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_auto_resume_skips_an_incomplete_checkpoint_with_a_warning(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    _checkpoint(tmp_path, 2, complete=True)
    _checkpoint(tmp_path, 10, complete=True)
    partial = _checkpoint(tmp_path, 12, complete=False)  # killed while the Trainer was writing it
    with caplog.at_level(logging.WARNING, logger="self_model"):
        assert prepare_output_dir(tmp_path, "auto") == str(tmp_path / "checkpoint-10")
    assert f"skipping {partial}: it is incomplete" in caplog.text
    with pytest.raises(UserError, match="checkpoint-12 is incomplete"):
        prepare_output_dir(tmp_path, str(partial))
    _checkpoint(tmp_path / "only_partial", 3, complete=False)
    with pytest.raises(UserError, match="resume_from_checkpoint=auto"):  # a partial checkpoint still marks a run
        prepare_output_dir(tmp_path / "only_partial", None)
    assert prepare_output_dir(tmp_path / "only_partial", "auto") is None  # nothing complete: from scratch


def test_a_run_killed_while_saving_resumes_to_the_same_losses(pretrain_config: Any, tmp_path: Path) -> None:
    """Train 6 of 8 steps (complete checkpoints at 3 and 6), then leave a half-written checkpoint-7 as a kill during
    its save would: auto-resume continues from checkpoint-6 and logs exactly the uninterrupted run's losses."""
    import shutil

    from self_model.pretrain import train_pretrain

    steps = {"training_args.save_steps": "3", "training_args.per_device_train_batch_size": "8",
             "training_args.learning_rate": "3.0e-3", "training_args.eval_strategy": "no"}
    reference = train_pretrain.main(pretrain_config({**steps, "training_args.max_steps": "8",
                                                     "training_args.output_dir": str(tmp_path / "ref")}))
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "ref", killed, ignore=shutil.ignore_patterns("final", "checkpoint-8"))
    # the run as it was when killed at step 7: history up to step 6 (the resume rewrites metrics.jsonl from it)
    partial = killed / "checkpoint-7"
    shutil.copytree(killed / "checkpoint-6", partial)
    (partial / "trainer_state.json").unlink()  # the Trainer writes it last: the save did not finish
    resumed = train_pretrain.main(pretrain_config({**steps, "training_args.max_steps": "8",
                                                   "training_args.output_dir": str(killed),
                                                   "training_args.resume_from_checkpoint": "auto"}))
    got, want = _losses(resumed.parent), _losses(reference.parent)
    assert sorted(got) == list(range(1, 9)) == sorted(want)
    assert all(math.isclose(got[s], want[s], rel_tol=1e-6, abs_tol=1e-7) for s in range(1, 9)), (got, want)
    state = json.loads((killed / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8


SIGNAL_RUN = textwrap.dedent("""
    import os, signal, sys
    import transformers.trainer as hf_trainer
    from transformers import TrainerCallback

    class SignalAtStep(TrainerCallback):  # as a scheduler preempting the job in the middle of a step
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == int(os.environ["SIGNAL_AT_STEP"]):
                os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))

    hf_trainer.DEFAULT_CALLBACKS.append(SignalAtStep)
    sys.argv = ["train_pretrain.py", *sys.argv[1:]]
    from self_model.pretrain.train_pretrain import main, PretrainConfig, run_main
    run_main(main, PretrainConfig, "")
""")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_says_how_to_resume(pretrain_config: Any, tiny_model_dir: Path,
                                                            tmp_path: Path, sig: str) -> None:
    out = tmp_path / "run"
    cfg = pretrain_config()
    args = ["--config", str(ROOT / "config/self_model_config/pretrain.yaml"),
            f"model_name_or_path={tiny_model_dir}", f"tokenizer_name_or_path={tiny_model_dir}",
            f"data.train_file={cfg.data.train_file}", "data.eval_file=null", f"data.cache_dir={cfg.data.cache_dir}",
            "training_args.max_steps=20", "training_args.save_steps=100", "training_args.logging_steps=1",
            "training_args.eval_strategy=no", "training_args.disable_tqdm=true", f"training_args.output_dir={out}"]
    result = subprocess.run([sys.executable, "-c", SIGNAL_RUN, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "SIGNAL_AT_STEP": "2", "SIGNAL": sig})
    signum = getattr(signal, sig)
    assert result.returncode == 128 + signum, result.stderr[-3000:]
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()  # the step in progress finished, then saved
    assert not (out / "final").exists() and not (out / "checkpoint-20").exists()
    assert (f"interrupted: {sig} stopped training at step 3: saved {out / 'checkpoint-3'}; no final/ was written. "
            "Resume with the same command plus training_args.resume_from_checkpoint=auto") in result.stderr
    assert prepare_output_dir(out, "auto") == str(out / "checkpoint-3")


# ---- divergence ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patience", [1, 3])
def test_a_diverging_run_stops_at_that_step_and_keeps_the_last_good_checkpoint(sft_config: Any, patience: int) -> None:
    from self_model.fine_tuning import train_finetune

    cfg = sft_config({"training_args.learning_rate": "1.0e+25", "training_args.max_steps": "10",
                      "training_args.save_steps": "1", "training_args.eval_strategy": "no",
                      "training_args.warmup_steps": "0", "divergence_patience": str(patience)})
    out = Path(cfg.training_args["output_dir"])
    with pytest.raises(UserError) as exc:
        train_finetune.main(cfg)
    logged = _losses(out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    bad = [r["step"] for r in rows if "grad_norm" in r and not math.isfinite(r["grad_norm"])]
    first_bad = bad[0]
    assert first_bad >= 2  # step 1 was finite and checkpointed
    stop = first_bad + patience - 1
    assert max(logged) == stop and bad == list(range(first_bad, stop + 1))  # stopped there, not at max_steps 10
    kept = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert kept and max(kept) == first_bad - 1  # nothing saved once the gradients went non-finite
    assert not (out / "final").exists()
    message = str(exc.value)
    assert f"training diverged at step {stop} (" in message and f"divergence_patience: {patience}" in message
    assert f"the last good checkpoint is {out / f'checkpoint-{first_bad - 1}'}" in message
    assert "training_args.learning_rate" in message and "fp16 overflow" in message


# ---- preflight -------------------------------------------------------------------------------------------
def _refused(make: Any, overrides: dict[str, str] | None = None, **sections: Any) -> str:
    from self_model.core.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        make(overrides, **sections)
    return "\n".join(exc.value.problems)


def test_preflight_refuses_non_positive_sizes_naming_the_key(sft_config: Any) -> None:
    text = _refused(sft_config, {"training_args.per_device_train_batch_size": "0", "divergence_patience": "0",
                                 "training_args.gradient_accumulation_steps": "-1", "peft.lora_rr": "8"})
    assert "training_args.per_device_train_batch_size: must be a positive whole number, got 0" in text
    assert "training_args.gradient_accumulation_steps: must be a positive whole number, got -1" in text
    assert "divergence_patience: expected a whole number of at least 1, got 0" in text
    assert "peft.lora_rr: unknown key" in text  # reported with the other first-pass mistakes


def test_preflight_refuses_max_length_beyond_the_models_positions(sft_config: Any, tiny_model_dir: Path) -> None:
    positions = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    sft_config({"data.max_length": str(positions)})  # exactly the context: fine
    text = _refused(sft_config, {"data.max_length": str(positions + 1)})
    assert (f"data.max_length: {positions + 1} is beyond the model's {positions} positions "
            f"(max_position_embeddings in its config.json)") in text
    assert f"data.max_length: {positions} or less" in text


def _model_copy(tiny_model_dir: Path, tmp_path: Path, **config: Any) -> Path:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, **config}))
    return folder


def test_preflight_refuses_packing_where_attention_ignores_sample_boundaries(sft_config: Any, tiny_model_dir: Path,
                                                                             tmp_path: Path) -> None:
    sft_config({"data.packing": "true"})  # the tiny Qwen2 on sdpa: per-document attention is installed
    text = _refused(sft_config, {"data.packing": "true", "trust_remote_code": "true"})
    assert "data.packing with a remote-code model" in text and "set data.packing: false" in text
    chatglm = _model_copy(tiny_model_dir, tmp_path / "glm", model_type="chatglm",
                          auto_map={"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"})
    assert "model_type 'chatglm'" in _refused(sft_config, {"data.packing": "true", "model_name_or_path": str(chatglm)})
    eager = _model_copy(tiny_model_dir, tmp_path / "eager", attn_implementation="eager")
    text = _refused(sft_config, {"data.packing": "true", "model_name_or_path": str(eager)})
    assert "data.packing with attn_implementation: eager" in text
    sft_config({"data.packing": "false", "model_name_or_path": str(eager)})  # eager is fine unpacked


def test_preflight_refuses_bf16_on_a_gpu_without_it(sft_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    sft_config({"training_args.bf16": "true", "training_args.fp16": "false"})  # a CPU falls back by itself
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    text = _refused(sft_config, {"training_args.bf16": "true", "training_args.fp16": "false"})
    assert "training_args.bf16: true, but this GPU (Tesla V100) has no bf16" in text
    assert "training_args.fp16: true" in text


def test_preflight_refuses_too_little_disk_for_the_kept_checkpoints(sft_config: Any, tiny_model_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil as real_shutil

    from self_model.core import preflight
    config = json.loads((tiny_model_dir / "config.json").read_text())
    params = preflight.parameter_count(config)
    from transformers import AutoModelForCausalLM

    real = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert abs(params - real) / real < 0.05, (params, real)  # the estimate from config.json is close
    usage = real_shutil.disk_usage("/")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage._replace(free=params * 20))
    full = {"peft.enabled": "false", "training_args.save_total_limit": "3"}
    text = _refused(sft_config, full)  # 3 x (weights + Adam) + final/ > 20 bytes a parameter
    assert "training_args.save_total_limit: 3 checkpoint(s) of this model" in text
    assert "lower training_args.save_total_limit, train LoRA (peft.enabled: true)" in text
    sft_config({**full, "training_args.save_total_limit": "1"})  # 1 x 10 + 2 bytes a parameter fits
    sft_config({"peft.enabled": "true"})  # LoRA checkpoints are small


def test_preflight_reports_every_problem_with_the_other_config_errors(sft_config: Any) -> None:
    text = _refused(sft_config, {"data.max_length": "999999", "data.packing": "true", "trust_remote_code": "true",
                                 "template": "qwen"})
    assert "data.max_length: 999999 is beyond" in text and "data.packing with a remote-code model" in text
    assert "template / template_path: set one of them, not both" in text


def test_a_missing_shared_checkout_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import skip_unless_ci

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        skip_unless_ci("../shared is absent")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set, so these tests must run"):
        skip_unless_ci("../shared is absent")


# ---- every shipped YAML ----------------------------------------------------------------------------------
SHIPPED_DIR = ROOT / "config" / "self_model_config"
DRY_RUN_HERE = ["export.yaml", "finetune.yaml", "inference.yaml", "pretrain.yaml", "rlhf.yaml"]
DRY_RUN_ELSEWHERE = {  # their own tests load and dry-run them
    "eval.yaml": "tests/test_evaluate.py", "reward.yaml": "tests/test_reward_model.py",
    "preference.yaml": "tests/test_preference_losses.py", "pipeline.yaml": "tests/test_pipeline.py"}


def test_every_shipped_yaml_loads_and_dry_runs(sft_config: Any, pretrain_config: Any, tiny_model_dir: Path,
                                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each shipped YAML, pointed at the tiny model (and an SFT adapter where it starts from one), passes its
    config checks (preflight included) and its entry script's --dry-run; a YAML added later must join here."""
    import yaml
    from rl_helpers import make_sft_adapter, rl_config

    from self_model.core.config import load_config
    from self_model.fine_tuning import train_finetune
    from self_model.pretrain import train_pretrain
    from self_model.rlhf import train_dpo, train_grpo
    from self_model.rlhf.config import DPOStageConfig, GRPOStageConfig
    from self_model.tools import export_model, generate
    from self_model.tools.export_config import ExportConfig

    unchecked = {p.name for p in SHIPPED_DIR.glob("*.yaml")} - set(DRY_RUN_HERE) - set(DRY_RUN_ELSEWHERE)
    assert not unchecked, f"add {sorted(unchecked)} to this test"
    assert train_finetune.main(sft_config(), dry_run=True) is None
    assert train_pretrain.main(pretrain_config(), dry_run=True) is None
    adapter = make_sft_adapter(tiny_model_dir, tmp_path / "sft" / "final")
    assert train_dpo.main(rl_config(DPOStageConfig, tiny_model_dir, tmp_path / "rl", adapter), dry_run=True) is None
    assert train_grpo.main(rl_config(GRPOStageConfig, tiny_model_dir, tmp_path / "rl", adapter), dry_run=True) is None
    export = yaml.safe_load((SHIPPED_DIR / "export.yaml").read_text(encoding="utf-8"))
    export.update(model_name_or_path=str(adapter), output_dir=str(tmp_path / "export"))
    export["check"]["data_file"] = str(ROOT / "data_process" / "sample_data" / "sft_eval.jsonl")  # no run_config
    assert export_model.main(load_config(ExportConfig, None, data=export), dry_run=True) is None
    inference = yaml.safe_load((SHIPPED_DIR / "inference.yaml").read_text(encoding="utf-8"))
    inference.update(model_name_or_path=str(adapter))
    assert load_config(generate.InferenceConfig, None, data=inference).model_name_or_path == str(adapter)
    assert not any((tmp_path / name).exists() for name in ("rl", "export"))  # a dry run writes nothing


def test_a_pad_token_equal_to_the_end_of_turn_token_still_trains_the_end_of_turns(sft_config: Any,
                                                                                  tiny_model_dir: Path) -> None:
    """Preflight has nothing to refuse here: the SFT collators mask padding by position (labels padded with -100),
    never by comparing ids with pad_token_id, so `<|im_end|>` as pad keeps every end of turn trained."""
    from transformers import AutoTokenizer

    from self_model.fine_tuning.data import IGNORE_INDEX, build_sft_dataset, make_collator
    from self_model.template.resolve import resolve_template

    cfg = sft_config()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = "<|im_end|>"
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token_id == eot
    dataset, _ = build_sft_dataset(cfg.data.train_file, tokenizer, resolve_template(cfg, tokenizer), cfg.data, 4)
    features = [dataset[i] for i in range(4)]
    for packing in (False, True):
        batch = make_collator(tokenizer, packing=packing)(features)
        labels, ids = batch["labels"], batch["input_ids"]
        trained_eot = ((labels == eot) & (ids == eot)).sum().item()
        assert trained_eot == sum(f["labels"].count(eot) for f in features) > 0, packing
        if not packing:  # and the padding itself is never trained
            lengths = [len(f["input_ids"]) for f in features]
            assert all((labels[i, n:] == IGNORE_INDEX).all() for i, n in enumerate(lengths))


# ---- distributed faults (2 processes, torchrun, gloo on CPU) ---------------------------------------------
DDP_RUN = textwrap.dedent("""
    import os, signal, sys, time
    import transformers.trainer as hf_trainer
    from transformers import TrainerCallback

    class Fault(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            rank, step = int(os.environ["RANK"]), state.global_step
            if os.environ["FAULT"] == "kill" and rank == 1 and step == 3:
                open(os.environ["MARK"], "w").write(str(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)  # a node dies
            if os.environ["FAULT"] == "term" and rank == 0 and step == 2:
                open(os.environ["MARK"], "w").write(str(time.time()))
                os.kill(os.getppid(), signal.SIGTERM)  # the scheduler preempts the job: torchrun forwards it

    hf_trainer.DEFAULT_CALLBACKS.append(Fault)
    sys.argv = ["train_pretrain.py", *sys.argv[1:]]
    from self_model.pretrain.train_pretrain import main, PretrainConfig, run_main
    run_main(main, PretrainConfig, "")
""")


def _ddp(pretrain_config: Any, tiny_model_dir: Path, tmp_path: Path, fault: str) -> tuple[Any, float, Path]:
    from conftest import free_port

    out, script, mark = tmp_path / "run", tmp_path / "ddp_run.py", tmp_path / "fault_time"
    script.write_text(DDP_RUN)
    cfg = pretrain_config()
    args = ["--config", str(ROOT / "config/self_model_config/pretrain.yaml"),
            f"model_name_or_path={tiny_model_dir}", f"tokenizer_name_or_path={tiny_model_dir}",
            f"data.train_file={cfg.data.train_file}", "data.eval_file=null", f"data.cache_dir={cfg.data.cache_dir}",
            "training_args.max_steps=200", "training_args.save_steps=1000", "training_args.logging_steps=1",
            "training_args.per_device_train_batch_size=2", "training_args.eval_strategy=no",
            "training_args.disable_tqdm=true", f"training_args.output_dir={out}"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             free_port(), str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "FAULT": fault, "MARK": str(mark), "OMP_NUM_THREADS": "1",
                                 "PYTHONUNBUFFERED": "1"})
    return result, time.time() - float(mark.read_text()), out


def test_a_killed_rank_does_not_leave_the_other_hanging(pretrain_config: Any, tiny_model_dir: Path,
                                                        tmp_path: Path) -> None:
    result, after_kill, out = _ddp(pretrain_config, tiny_model_dir, tmp_path, "kill")
    assert result.returncode != 0
    assert after_kill < 60, f"the surviving rank took {after_kill:.0f}s to exit"  # bounded: no hang on a collective
    assert "exitcode  : -9" in result.stderr and "Signal 9 (SIGKILL) received by PID" in result.stderr
    assert not (out / "final").exists()


def test_a_preempted_distributed_run_saves_one_checkpoint_and_says_how_to_resume(pretrain_config: Any,
                                                                                 tiny_model_dir: Path,
                                                                                 tmp_path: Path) -> None:
    result, _, out = _ddp(pretrain_config, tiny_model_dir, tmp_path, "term")
    assert result.returncode != 0
    saved = [p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    assert len(saved) == 1 and not (out / "final").exists(), result.stderr[-3000:]
    assert "interrupted: SIGTERM stopped training at step" in result.stderr
    assert "training_args.resume_from_checkpoint=auto" in result.stderr


def test_preflight_refuses_qlora_with_fsdp(sft_config: Any) -> None:
    """FSDP shards packed 4-bit weights only with a float quant storage this toolkit does not set; ZeRO-3 works."""
    text = _refused(sft_config, {"peft.qlora": "true", "training_args.fsdp": "full_shard"})
    assert "peft.qlora with training_args.fsdp" in text and "use DeepSpeed ZeRO-3 for QLoRA" in text
    zero3 = "config/self_model_config/deepspeed/ds_zero3.json"
    sft_config({"peft.qlora": "true", "training_args.deepspeed": zero3})  # QLoRA + ZeRO-3: test_distributed.py
    sft_config({"peft.qlora": "true", "training_args.deepspeed": "config/self_model_config/deepspeed/ds_zero2.json"})
    sft_config({"training_args.deepspeed": zero3})


def test_run_info_is_written_whole(tmp_path: Path) -> None:
    """run_config.yaml / run_info.json are written beside and renamed: no half file, no leftover .tmp."""
    from self_model.core.run import write_atomic

    target = tmp_path / "run_info.json"
    target.write_text('{"old": true}', encoding="utf-8")
    write_atomic(target, '{"new": true}')
    assert target.read_text() == '{"new": true}' and not list(tmp_path.glob("*.tmp"))
