"""Scaling out: the accelerate configs, ZeRO-3 / FSDP2 runs whose final/ loads with plain transformers / peft, LoRA
resumed under ZeRO-3 and FSDP2 to the same losses, a two-node run simulated on one machine, and the effective batch
line every stage prints. Multi-process runs are 2 CPU processes over gloo, launched the way the README says.

FSDP on CPU: accelerate 1.15 turns FSDP on only for GPU-type processes (`AcceleratorState`: the FSDP branch is inside
`distributed_type in [MULTI_GPU, MULTI_NPU, ...]`; CPU processes are MULTI_CPU) and otherwise drops the plugin, so
the toolkit refuses it there (`core.run.check_sharding`). torch's FSDP2 itself runs on CPU over gloo: the FSDP2
runs below lift only that gate (`CPU_FSDP`, a wrapper that reports the CPU processes as MULTI_GPU to accelerate),
so the sharded training, the sharded checkpoints, resume and the gathered final/ are the real torch / accelerate /
transformers code. `test_fsdp2_on_gpus` runs the same without the wrapper where 2 GPUs exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, free_port, run_command

ACCELERATE = ROOT / "config" / "accelerate"
DEEPSPEED = ROOT / "config" / "self_model_config" / "deepspeed"
SFT = "self_model/fine_tuning/train_finetune.py"
SFT_CONFIG = "config/self_model_config/finetune.yaml"
# DeepSpeed compiles a C++ op on first use; one cache per environment (a cache shared with another checkout's venv
# is rebuilt at every switch, ~2 minutes each).
TORCH_EXTENSIONS = Path.home() / ".cache" / "self_model" / "torch_extensions" / hashlib.sha1(
    sys.prefix.encode()).hexdigest()[:10]
ENV = {"OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(TORCH_EXTENSIONS)}
# Two processes x 2 rows per device x 1 accumulation, 4 steps, a checkpoint every 2, no evaluation (time).
SMALL = ["training_args.max_steps=4", "training_args.save_steps=2", "training_args.logging_steps=1",
         "training_args.per_device_train_batch_size=2", "training_args.gradient_accumulation_steps=1",
         "data.eval_file=null", "training_args.disable_tqdm=true"]
BATCH_LINE = "effective batch: 2 process(es) x 2 per device x 1 accumulation = 4 rows per optimizer step"
CPU_FSDP = """
import runpy, sys
import accelerate.state as state
from accelerate.utils import DistributedType

init = state.PartialState.__init__
def as_gpu_processes(self, *args, **kwargs):  # accelerate enables FSDP for GPU-type processes only
    init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.MULTI_GPU
state.PartialState.__init__ = as_gpu_processes
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
# transformers' own FSDP2 form. Not `cpu_offload: true` on CPU: torch pins the offloaded shards in page-locked memory
# through CUDA ("RuntimeError: Found no NVIDIA driver on your system" in FSDPParam._init_sharded_param), so offload is
# tested on GPUs only (test_fsdp2_on_gpus).
FSDP2_ARGS = ["training_args.fsdp=true", "training_args.fsdp_config={version: 2, reshard_after_forward: true, "
              "auto_wrap_policy: TRANSFORMER_BASED_WRAP, state_dict_type: SHARDED_STATE_DICT}"]


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            free_port(), *args]


def accelerate_launch(config: str, *args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", f"config/accelerate/{config}",
            "--num_processes", "2", "--main_process_port", free_port(), *args]


def run(command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    TORCH_EXTENSIONS.mkdir(parents=True, exist_ok=True)
    result = run_command(command, timeout=900, **{**ENV, **env})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def losses(out: Path) -> dict[int, float]:
    """step -> training loss, from the run's metrics.jsonl (rewritten from the restored history on resume)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def resumed_copy(run_dir: Path, step: int, to: Path) -> Path:
    """What a run killed after its checkpoint-`step` leaves behind."""
    to.mkdir()
    shutil.copytree(run_dir / f"checkpoint-{step}", to / f"checkpoint-{step}")
    return to


def adapter(folder: Path) -> dict[str, Any]:
    """The trained adapter loaded onto the plain base with peft, as its tensors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(ROOT / "self_model" / "checkpoints" / "tiny_qwen2")
    model = PeftModel.from_pretrained(base, str(folder))
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def assert_same_run(first: Path, resumed: Path) -> None:
    import torch

    a, b = losses(first), losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4], (a, b)
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)
    wa, wb = adapter(first / "final"), adapter(resumed / "final")
    assert wa.keys() == wb.keys() and len(wa) > 0
    lora_b = [n for n in wa if "lora_B" in n]  # B starts at zero: non-zero means trained weights were gathered
    assert lora_b and all(wa[n].abs().sum() > 0 for n in lora_b)
    assert all(torch.allclose(wa[n], wb[n], atol=1e-5) for n in wa)


# ---- the configs ----------------------------------------------------------------------------------------------
def test_accelerate_configs_load_with_accelerate_and_use_current_keys() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    names = sorted(p.name for p in ACCELERATE.glob("*.yaml"))
    assert names == ["ddp.yaml", "fsdp2.yaml", "fsdp2_offload.yaml", "zero2.yaml", "zero3.yaml", "zero3_offload.yaml"]
    for name in names:
        config = load_config_from_file(str(ACCELERATE / name))  # accelerate's own reader: unknown keys fail
        raw = yaml.safe_load((ACCELERATE / name).read_text())
        assert f"--config_file config/accelerate/{name}" in (ACCELERATE / name).read_text()  # its own command
        if name.startswith("fsdp"):
            fsdp = raw["fsdp_config"]
            # FSDP2 (fully_shard); none of FSDP1's keys (sharding strategy, prefetch, use_orig_params)
            assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
            assert not {"fsdp_sharding_strategy", "fsdp_backward_prefetch", "fsdp_use_orig_params",
                        "fsdp_forward_prefetch"} & set(fsdp)
            assert fsdp["fsdp_offload_params"] is ("offload" in name)
        if name.startswith("zero"):
            ds = json.loads((ROOT / config.deepspeed_config["deepspeed_config_file"]).read_text())
            zero = ds["zero_optimization"]
            assert zero["stage"] == int(name[4]) and ("offload_param" in zero) is ("offload" in name)
            if zero["stage"] == 3:
                assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # final/ loads with transformers


def test_fsdp_through_training_args_without_deprecated_keys(caplog: pytest.LogCaptureFixture) -> None:
    """`fsdp: true` + `fsdp_config` (version 2) is transformers 5's way; a string `fsdp` is deprecated."""
    import logging

    from transformers import TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()  # transformers' loggers stop at "transformers" otherwise: caplog sees nothing
    config = {"version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
              "state_dict_type": "SHARDED_STATE_DICT", "cpu_offload": True}
    with caplog.at_level(logging.WARNING):
        args = TrainingArguments(output_dir="unused", use_cpu=True, fsdp=True, fsdp_config=config)
    assert args.fsdp_plugin_args["fsdp_version"] == 2 and args.fsdp_plugin_args["cpu_offload"] is True
    assert "deprecated" not in caplog.text
    with caplog.at_level(logging.WARNING):
        TrainingArguments(output_dir="unused", use_cpu=True, fsdp="full_shard")
    hf_logging.disable_propagation()
    assert "Passing `fsdp` as a string is deprecated" in caplog.text  # what the README's form avoids


def test_fsdp_where_accelerate_would_drop_it_is_refused(sft_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU processes (or one process) accelerate silently trains unsharded: refused before training."""
    from self_model.core.errors import UserError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")  # accelerate sets it to true in this process: restored after
    from self_model.fine_tuning.train_finetune import main

    cfg = sft_config({"training_args.fsdp": "true", "training_args.max_steps": 1, "data.eval_file": "null"})
    with pytest.raises(UserError, match="FSDP was asked for .* where it does not shard: FSDP needs 2 or more GPU"):
        main(cfg)
    assert not Path(cfg.training_args["output_dir"]).exists()  # refused before loading anything


def test_preflight_on_sharded_saves_and_qlora(sft_config: Any, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from self_model.core.config import ConfigError

    no_gather = tmp_path / "zero3_no_gather.json"
    ds = json.loads((DEEPSPEED / "ds_zero3.json").read_text())
    ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    no_gather.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match="without stage3_gather_16bit_weights_on_model_save: true would leave"):
        sft_config({"training_args.deepspeed": str(no_gather)})
    with pytest.raises(ConfigError, match="peft.qlora with training_args.fsdp: FSDP shards bitsandbytes' packed"):
        sft_config({"peft.qlora": "true", "training_args.fsdp": "true"})
    # The same checks for `accelerate launch` configs, which reach the processes as environment variables.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="peft.qlora with the accelerate FSDP config: .* use DeepSpeed ZeRO-3"):
        sft_config({"peft.qlora": "true"})
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match=r"the accelerate DeepSpeed config \(inline\): ZeRO-3 without"):
        sft_config()  # accelerate's inline zero3 keys without zero3_save_16bit_model
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(DEEPSPEED / "ds_zero3.json"))
    sft_config({"peft.qlora": "true"})  # QLoRA with ZeRO-3: test_qlora_with_zero3_trains_as_with_ddp


# ---- ZeRO-3 ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_zero3_lora_resumes_to_the_same_losses_and_final_loads_with_peft(tmp_path: Path) -> None:
    """accelerate launch with config/accelerate/zero3.yaml, then the same run resumed from its checkpoint-2 with
    torchrun --deepspeed ds_zero3.json: the same losses and the same adapter, gathered into a plain peft folder."""
    pytest.importorskip("deepspeed", reason="needs the deepspeed extra: uv sync --extra deepspeed")
    first = tmp_path / "first"
    result = run(accelerate_launch("zero3.yaml", SFT, "--config", SFT_CONFIG, f"training_args.output_dir={first}",
                                   *SMALL))
    assert (result.stdout + result.stderr).count(BATCH_LINE) == 1  # rank 0 only, whatever the launcher
    assert "tokens per step: ~" in result.stderr and "at most 2,048 (512 per row)" in result.stderr
    assert sorted(p.name for p in (first / "checkpoint-2" / "global_step2").glob("*model_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]  # partitioned
    resumed = resumed_copy(first, 2, tmp_path / "resumed")
    result = run(torchrun(SFT, "--config", SFT_CONFIG, "--deepspeed", str(DEEPSPEED / "ds_zero3.json"),
                          f"training_args.output_dir={resumed}", "training_args.resume_from_checkpoint=auto", *SMALL))
    assert BATCH_LINE in result.stderr
    assert_same_run(first, resumed)


@pytest.mark.slow
def test_zero3_full_training_saves_weights_that_load_with_transformers(tmp_path: Path) -> None:
    """Continued pretraining (all weights) under ZeRO-3: final/model.safetensors holds every weight, gathered."""
    pytest.importorskip("deepspeed", reason="needs the deepspeed extra: uv sync --extra deepspeed")
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "cpt"
    run(torchrun("self_model/pretrain/train_pretrain.py", "--config", "config/self_model_config/pretrain.yaml",
                 "--deepspeed", str(DEEPSPEED / "ds_zero3.json"), f"training_args.output_dir={out}",
                 f"data.cache_dir={tmp_path / 'cache'}", *SMALL))
    start = AutoModelForCausalLM.from_pretrained(ROOT / "self_model" / "checkpoints" / "tiny_qwen2")
    trained = AutoModelForCausalLM.from_pretrained(out / "final")
    a, b = dict(start.named_parameters()), dict(trained.named_parameters())
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # trained, and not the partitioned 0-size placeholders


@pytest.mark.slow
def test_qlora_with_zero3_trains_as_with_ddp(tmp_path: Path, two_node_run: tuple[Path, str]) -> None:
    """QLoRA under ZeRO-3 with every weight partitioned, the packed 4-bit ones included (persistence threshold 0; the
    shipped "auto" keeps a tiny model's small tensors whole): the same losses as the same QLoRA run with plain DDP
    (the two-node run: 2 processes, 2 rows each, as here)."""
    pytest.importorskip("deepspeed", reason="needs the deepspeed extra: uv sync --extra deepspeed")
    ds = json.loads((DEEPSPEED / "ds_zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3_all.json").write_text(json.dumps(ds))
    zero3 = tmp_path / "zero3"
    run(torchrun(SFT, "--config", SFT_CONFIG, "--deepspeed", str(tmp_path / "zero3_all.json"), "peft.qlora=true",
                 f"training_args.output_dir={zero3}", *SMALL))
    a, b = losses(zero3), losses(two_node_run[0])
    assert sorted(a) == [1, 2, 3, 4] and all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)
    assert any(v.abs().sum() > 0 for n, v in adapter(zero3 / "final").items() if "lora_B" in n)


# ---- FSDP2 ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fsdp2_lora_resumes_to_the_same_losses_and_final_loads_with_peft(tmp_path: Path) -> None:
    """accelerate launch with config/accelerate/fsdp2.yaml (sharded checkpoints), then resumed from checkpoint-2 with
    torchrun and training_args.fsdp + fsdp_config (transformers' way): same losses; final/ is a plain peft folder.
    On CPU through `CPU_FSDP` (see the module docstring)."""
    wrapper = tmp_path / "cpu_fsdp.py"
    wrapper.write_text(CPU_FSDP)
    first = tmp_path / "first"
    result = run(accelerate_launch("fsdp2.yaml", str(wrapper), SFT, "--config", SFT_CONFIG,
                                   f"training_args.output_dir={first}", *SMALL))
    assert BATCH_LINE in result.stderr
    assert (first / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()  # sharded (torch distributed checkpoint)
    resumed = resumed_copy(first, 2, tmp_path / "resumed")
    run(torchrun(str(wrapper), SFT, "--config", SFT_CONFIG, f"training_args.output_dir={resumed}",
                 "training_args.resume_from_checkpoint=auto", *FSDP2_ARGS, *SMALL))
    assert_same_run(first, resumed)


@pytest.mark.gpu
@pytest.mark.slow
def test_fsdp2_on_gpus(tmp_path: Path) -> None:
    """The same FSDP2 run with nothing lifted, on 2 GPUs; resumed with CPU offload (fsdp2_offload.yaml), which needs
    CUDA for its pinned host memory."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("FSDP needs 2 GPUs")
    first = tmp_path / "first"
    run(accelerate_launch("fsdp2.yaml", SFT, "--config", SFT_CONFIG, f"training_args.output_dir={first}", *SMALL))
    resumed = resumed_copy(first, 2, tmp_path / "resumed")
    run(accelerate_launch("fsdp2_offload.yaml", SFT, "--config", SFT_CONFIG, f"training_args.output_dir={resumed}",
                          "training_args.resume_from_checkpoint=auto", *SMALL))
    assert_same_run(first, resumed)


# ---- two nodes ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """QLoRA SFT with `torchrun --nnodes 2 --node_rank 0|1 --master_addr` as on two machines, both here over
    127.0.0.1; the run folder is the shared storage both see. (run folder, node 0's log)"""
    out, port = tmp_path_factory.mktemp("two_nodes") / "run", free_port()
    env = {**os.environ, **ENV, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"}
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--master_addr",
            "127.0.0.1", "--master_port", port]
    nodes = [subprocess.Popen([*node, "--node_rank", str(rank), SFT, "--config", SFT_CONFIG, "peft.qlora=true",
                               f"training_args.output_dir={out}", *SMALL],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[1][-3000:] for o in outputs)
    return out, outputs[0][1]


@pytest.mark.slow
def test_two_nodes_simulated_on_one_machine(two_node_run: tuple[Path, str]) -> None:
    out, log = two_node_run
    assert BATCH_LINE in log  # the world is both nodes
    assert (out / "final" / "adapter_model.safetensors").is_file()
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and len(losses(out)) == 4
