"""PPO / GRPO with verl: the YAML as verl overrides, the prompts as verl's parquet, the runnable command line.

Unmarked tests run anywhere (no verl needed). Tests marked `verl` compose verl's own Hydra config with the generated
overrides and run verl's validation, dataset and reward loading on CPU; they skip unless verl is installed:

    UV_PROJECT_ENVIRONMENT=/tmp/venv-rlhf uv run --extra rlhf --extra trace pytest -m verl
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shlex
import stat
import subprocess
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from rl_helpers import ROOT, SAMPLES, TEMPLATE, make_sft_adapter, rl_config

from self_model.core.errors import ConfigError, UserError
from self_model.rlhf.config import GRPOStageConfig, PPOStageConfig
from self_model.rlhf.ppo_grpo import rewards
from self_model.rlhf.ppo_grpo import verl_bridge as verl_backend
from self_model.rlhf.ppo_grpo.verl_bridge import OVERRIDES_FILE, hydra_value, verl_overrides

HAS_VERL = importlib.util.find_spec("verl") is not None
needs_verl = pytest.mark.skipif(not HAS_VERL, reason="verl is not installed (the rlhf extra); run these with "
                                "UV_PROJECT_ENVIRONMENT=<venv> uv run --extra rlhf --extra trace pytest -m verl")
VERL = {"ppo.backend": "verl", "ppo.prepare_only": "true"}
FIRST_PROMPT = [{"role": "user", "content": "成年人正常腋下体温的上限大约是多少摄氏度？只回答数字。"}]


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sft_adapter(tiny_model_dir, tmp_path_factory.mktemp("sft") / "final")


@pytest.fixture
def make(tiny_model_dir: Path, sft_adapter: Path, tmp_path: Path):
    def build(cls: type = GRPOStageConfig, overrides: dict[str, Any] | None = None, adapter: bool = True) -> Any:
        return rl_config(cls, tiny_model_dir, tmp_path / "run", sft_adapter if adapter else None,
                         {**VERL, **(overrides or {})})

    return build


def as_dict(overrides: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in overrides)


def command_args(run_dir: Path) -> list[str]:
    text = (run_dir / OVERRIDES_FILE).read_text(encoding="utf-8")
    return shlex.split(text.replace("\\\n", " "), comments=True)


# ---- the translation (no verl needed) ---------------------------------------------------------------------------
def test_grpo_overrides(make: Any, sft_adapter: Path, tmp_path: Path) -> None:
    cfg = make(overrides={"ppo.extra_overrides": "[trainer.save_freq=20, actor_rollout_ref.rollout.n=8]",
                          "ppo.rollout_n": "8"})
    ov = as_dict(verl_overrides(cfg, tmp_path / "run", "/tok", has_eval=True))
    run = (tmp_path / "run").resolve()
    assert ov["algorithm.adv_estimator"] == "grpo" and ov["actor_rollout_ref.actor.use_kl_loss"] == "true"
    assert ov["data.train_files"] == f"{run}/data/train.parquet" and ov["data.val_files"] == f"{run}/data/eval.parquet"
    assert ov["data.max_prompt_length"] == "128" and ov["data.max_response_length"] == "16"
    assert ov["actor_rollout_ref.model.lora_adapter_path"] == str(sft_adapter.resolve())
    assert ov["actor_rollout_ref.model.lora_rank"] == "8"  # the adapter's own r
    assert ov["actor_rollout_ref.model.target_modules"] == "[k_proj,o_proj,q_proj,v_proj]"
    assert ov["actor_rollout_ref.actor.optim.lr"] == "0.0005" and ov["trainer.n_gpus_per_node"] == "8"
    assert ov["reward.custom_reward_function.path"] == str(Path(rewards.__file__).resolve())
    assert ov["reward.custom_reward_function.name"] == "compute_score"
    assert ov["+reward.custom_reward_function.reward_kwargs.rewards"] == "[normalized_match,length_penalty]"
    assert ov["+reward.custom_reward_function.reward_kwargs.weights"] == "[1.0,0.5]"
    assert ov["trainer.logger"] == "[console]" and ov["trainer.default_local_dir"] == f"{run}/checkpoints"
    assert not any(key.startswith("critic.") for key in ov)
    # extra_overrides are appended and replace a generated key they name
    assert ov["trainer.save_freq"] == "20" and ov["actor_rollout_ref.rollout.n"] == "8"
    assert verl_overrides(cfg, tmp_path / "run", "/tok", True).count("actor_rollout_ref.rollout.n=8") == 1


def test_ppo_overrides_add_a_critic_and_leave_kl_loss_off(make: Any, tmp_path: Path) -> None:
    cfg = make(PPOStageConfig, {"ppo.rollout_n": "1", "ppo.n_gpus_per_node": "1", "ppo.train_batch_size": "4",
                                "ppo.ppo_mini_batch_size": "2", "ppo.ppo_micro_batch_size_per_gpu": "1",
                                "trace": "wandb"}, adapter=False)
    ov = as_dict(verl_overrides(cfg, tmp_path / "run", "/tok", has_eval=False))
    assert ov["algorithm.adv_estimator"] == "gae" and ov["actor_rollout_ref.actor.use_kl_loss"] == "false"
    assert ov["critic.model.path"] == str(Path(cfg.model_name_or_path).resolve()) and ov["critic.optim.lr"] == "1e-05"
    assert ov["critic.ppo_micro_batch_size_per_gpu"] == "1" and ov["critic.model.tokenizer_path"] == "/tok"
    assert ov["actor_rollout_ref.model.lora_rank"] == "8" and "actor_rollout_ref.model.lora_adapter_path" not in ov
    assert ov["actor_rollout_ref.rollout.tensor_model_parallel_size"] == "1"  # one GPU
    assert ov["data.val_files"] == ov["data.train_files"] and ov["trainer.val_before_train"] == "false"
    assert ov["trainer.logger"] == "[console,wandb]"


def test_reward_model_only_and_user_function_paths(make: Any, tmp_path: Path) -> None:
    user = tmp_path / "my rewards.py"
    user.write_text("def r(data_source, solution_str, ground_truth, extra_info=None, **kw):\n    return 0.0\n")
    cfg = make(overrides={"ppo.reward.functions": f"['{user}:r', format]", "ppo.reward.weights": "null"})
    ov = as_dict(verl_overrides(cfg, tmp_path / "run", "/tok", True))
    assert ov["+reward.custom_reward_function.reward_kwargs.rewards"] == f"['{user.resolve()}:r',format]"
    cfg = make(overrides={"ppo.reward.functions": "[]", "ppo.reward.weights": "null",
                          "ppo.reward.reward_model_name_or_path": "org/rm-7b"})
    ov = as_dict(verl_overrides(cfg, tmp_path / "run", "/tok", True))
    assert ov["reward.reward_model.enable"] == "true" and ov["reward.reward_model.model_path"] == "org/rm-7b"
    assert ov["reward.reward_model.rollout.name"] == "vllm" and "reward.custom_reward_function.path" not in ov


def test_hydra_values() -> None:
    assert hydra_value([1.0, "a/b.py:f", True, None]) == "[1.0,a/b.py:f,true,null]"
    assert hydra_value("/a dir/it's") == "'/a dir/it\\'s'" and hydra_value(1e-06) == "1e-06"


def test_prepare_only_writes_a_runnable_command_and_verls_parquet(make: Any, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoTokenizer

    from self_model.rlhf import train_grpo

    monkeypatch.setattr(verl_backend, "verl_installed", lambda: False)  # the same on a machine with verl
    cfg = make()
    run = train_grpo.main(cfg)
    assert run == Path(cfg.output_dir) and f"uv run --no-sync bash {run / OVERRIDES_FILE}" in capsys.readouterr().out
    # verl's schema: data_source, prompt as chat messages, ability, reward_model.ground_truth, extra_info
    rows = pq.read_table(run / "data" / "train.parquet").to_pylist()
    assert len(rows) == 30 and set(rows[0]) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert rows[0]["prompt"] == FIRST_PROMPT and rows[0]["data_source"] == "grpo_train"
    assert rows[0]["reward_model"] == {"style": "rule", "ground_truth": "37"}
    assert rows[0]["extra_info"] == {"split": "train", "index": 0, "source": f"{SAMPLES}/grpo_train.jsonl:1"}
    assert pq.read_table(run / "data" / "eval.parquet").num_rows == 8
    # the tokenizer verl renders prompts with carries the template
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    assert tokenizer.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n")
    info = json.loads((run / "run_info.json").read_text())
    assert info["backend"] == "verl" and info["verl_overrides"][0] == "algorithm.adv_estimator=grpo"
    # bash runs the file as it is: a fake `python` on PATH records the arguments it gets
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "ARGS_OUT": str(tmp_path / "args.txt")}
    subprocess.run(["bash", str(run / OVERRIDES_FILE)], env=env, check=True, timeout=30)
    received = (tmp_path / "args.txt").read_text(encoding="utf-8").splitlines()
    assert received == ["-m", "verl.trainer.main_ppo", f"hydra.run.dir={run.resolve()}/hydra", *info["verl_overrides"]]
    assert command_args(run)[4:] == info["verl_overrides"]


def test_dry_run_prints_the_command_and_writes_nothing(make: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from self_model.rlhf import train_ppo

    cfg = make(PPOStageConfig)
    assert train_ppo.main(cfg, dry_run=True) is None
    out = capsys.readouterr().out
    assert "python -m verl.trainer.main_ppo" in out and "algorithm.adv_estimator=gae" in out
    assert not Path(cfg.output_dir).exists()


def test_backend_verl_without_verl_writes_the_job_and_names_the_extra(make: Any, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Without verl (or GPUs) nothing is launched: the complete job is written and the message says what to install
    and run on the GPU machine (the guide's PPO command on a laptop)."""
    from self_model.rlhf import train_grpo

    monkeypatch.setattr(verl_backend, "verl_installed", lambda: False)
    cfg = make(overrides={"ppo.prepare_only": "false"})
    run_dir = train_grpo.main(cfg)
    out = capsys.readouterr().out
    assert "verl cannot train here: verl is not installed in this environment (the rlhf extra)" in out
    assert "uv sync --extra rlhf" in out and f"bash {run_dir / verl_backend.OVERRIDES_FILE}" in out
    assert (run_dir / verl_backend.OVERRIDES_FILE).is_file() and not (run_dir / "final").exists()


def test_launch_runs_the_written_command_and_reports_verls_failure(make: Any, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The launch runs exactly the command of verl_overrides.txt (verl itself cannot train on CPU: stubbed here)."""
    import sys

    from self_model.rlhf import train_grpo

    calls: list[list[str]] = []
    codes = iter([1, 0])
    monkeypatch.setattr(verl_backend, "verl_installed", lambda: True)
    monkeypatch.setattr(verl_backend, "why_verl_cannot_run_here", lambda: None)  # as on a GPU machine
    monkeypatch.setattr(verl_backend, "validate_with_verl", lambda overrides: None)
    real_run = subprocess.run

    def fake_run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        if args[1:3] != ["-m", "verl.trainer.main_ppo"]:
            return real_run(args, **kwargs)  # git, for run_info.json
        calls.append(args)
        return subprocess.CompletedProcess(args, next(codes))

    monkeypatch.setattr(subprocess, "run", fake_run)
    cfg = make(overrides={"ppo.prepare_only": "false"})
    with pytest.raises(UserError, match=r"verl exited with code 1 .*nothing was saved as a result"):
        train_grpo.main(cfg)
    run = Path(cfg.output_dir)
    assert calls[0][0] == sys.executable and calls[0][1:] == command_args(run)[1:]
    capsys.readouterr()
    assert train_grpo.main(cfg) == run  # preparing again is allowed until verl has written a result
    out = capsys.readouterr().out
    assert "verl finished; checkpoints in" in out and "python -m verl.model_merger merge --backend fsdp" in out
    assert calls[1] == calls[0]


# ---- bad input, refused before anything is written ---------------------------------------------------------------
def problems(make: Any, cls: type, overrides: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as err:
        make(cls, overrides)
    return str(err.value)


def test_verl_batch_rules_are_explained(make: Any) -> None:
    text = problems(make, GRPOStageConfig, {"ppo.train_batch_size": "3", "ppo.rollout_n": "2"})
    assert "train_batch_size x rollout_n = 3 x 2 = 6 replies per step must be divisible by the 8 GPUs" in text
    text = problems(make, GRPOStageConfig, {"ppo.ppo_mini_batch_size": "16"})
    assert "ppo.ppo_mini_batch_size (16) must be at most train_batch_size (8)" in text
    text = problems(make, GRPOStageConfig, {"ppo.ppo_mini_batch_size": "4", "ppo.rollout_n": "2"})
    assert "ppo_mini_batch_size x rollout_n = 4 x 2 = 8 replies per optimizer step" not in text  # 8 % 8 == 0
    assert "each GPU's share of a mini-batch (4 x 2 / 8 = 1 replies) must be a whole number of micro-batches" in text


def test_verl_choices_come_from_verl(make: Any) -> None:
    text = problems(make, GRPOStageConfig, {"ppo.rollout_backend": "hf", "ppo.logger": "[console, wandbb]",
                                            "peft.qlora": "true"})
    assert "ppo.rollout_backend: 'hf' is not a rollout engine of the installed verl (verl has no plain " in text
    assert "['vllm', 'sglang', 'trtllm']" in text
    assert "ppo.logger: 'wandbb' is not a verl logger (did you mean 'wandb'?)" in text
    assert "peft.qlora: verl trains LoRA on 16-bit weights" in text
    text = problems(make, GRPOStageConfig, {"peft.enabled": "false",
                                            "ppo.reward.reward_model_name_or_path": "org/rm"})
    assert "verl cannot merge an adapter" in text and "give either functions or reward_model_name_or_path" in text


def test_override_syntax_is_checked(make: Any) -> None:
    text = problems(make, GRPOStageConfig, {"ppo.extra_overrides": "['trainer.save_freq 20', '=3']"})
    assert "ppo.extra_overrides[0]: 'trainer.save_freq 20' is not a Hydra override" in text
    assert "ppo.extra_overrides[1]" in text


# ---- verl itself: compose, validate, load the data and the reward (CPU) -----------------------------------------
@pytest.mark.verl
@needs_verl
@pytest.mark.parametrize("cls", [GRPOStageConfig, PPOStageConfig], ids=["grpo", "ppo"])
def test_verl_composes_and_validates_the_generated_config(make: Any, cls: type,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from self_model.rlhf import train_grpo, train_ppo
    from self_model.rlhf.ppo_grpo.verl_bridge import compose_verl_config

    cfg = make(cls)
    run = (train_grpo if cls is GRPOStageConfig else train_ppo).main(cfg)
    assert "[validate_config] All configuration checks passed successfully!" in capsys.readouterr().out
    config = compose_verl_config(command_args(run)[4:])  # the command line exactly as written
    assert config.algorithm.adv_estimator == ("grpo" if cls is GRPOStageConfig else "gae")
    assert config.actor_rollout_ref.rollout.n == cfg.ppo.rollout_n
    assert config.reward.custom_reward_function.reward_kwargs.rewards == ["normalized_match", "length_penalty"]
    if cls is PPOStageConfig:
        assert config.critic.model.path == str(Path(cfg.model_name_or_path).resolve())


@pytest.mark.verl
@needs_verl
def test_verl_rejects_what_only_verl_knows_and_nothing_is_written(make: Any) -> None:
    from self_model.rlhf import train_grpo

    cfg = make(overrides={"ppo.extra_overrides": "[actor_rollout_ref.actor.loss_agg_mode=per-token]"})
    with pytest.raises(ConfigError, match=r"verl's config validation rejected .*Invalid loss_agg_mode: per-token"):
        train_grpo.main(cfg)
    assert not (Path(cfg.output_dir) / OVERRIDES_FILE).exists()
    cfg = make(overrides={"ppo.extra_overrides": "[actor_rollout_ref.actor.no_such_key=1]"})
    with pytest.raises(ConfigError, match=r"verl's Hydra config rejected the overrides: .*no_such_key"):
        train_grpo.main(cfg)


@pytest.mark.verl
@needs_verl
@pytest.mark.parametrize(("train", "n", "mini", "gpus"), [(8, 4, 8, 8), (4, 2, 2, 8), (3, 2, 2, 8), (4, 2, 8, 8),
                                                             (6, 1, 2, 4)])
def test_our_batch_rules_agree_with_verls_validation(make: Any, tmp_path: Path, train: int, n: int, mini: int,
                                                     gpus: int) -> None:
    """The rules verl's validate_config enforces (replies per step over GPUs, mini-batch within the step) give the
    same verdict here; the config is built without our checks so that verl alone decides."""
    from self_model.rlhf.ppo_grpo.checks import verl_batch_problems
    from self_model.rlhf.ppo_grpo.verl_bridge import validate_with_verl

    cfg = make()
    ppo = dataclasses.replace(cfg.ppo, train_batch_size=train, rollout_n=n, ppo_mini_batch_size=mini,
                              n_gpus_per_node=gpus, ppo_micro_batch_size_per_gpu=1)
    ours = [p for p in verl_batch_problems(ppo) if "micro-batches" not in p and "replies per optimizer step" not in p]
    overrides = verl_overrides(dataclasses.replace(cfg, ppo=ppo), tmp_path / "run", str(cfg.adapter_name_or_path),
                               has_eval=True)
    try:
        validate_with_verl(overrides)
        verl_ok = True
    except ConfigError:
        verl_ok = False
    assert verl_ok == (not ours), ours


@pytest.mark.verl
@needs_verl
def test_verl_loads_our_parquet_and_scores_with_our_reward(make: Any) -> None:
    """verl's own RL dataset reads the parquet (measuring every prompt with its tokenizer, none over the limit) and
    verl's own reward loader calls our compute_score with the reward_kwargs of the command line."""
    from transformers import AutoTokenizer
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from self_model.rlhf import train_grpo
    from self_model.rlhf.ppo_grpo.verl_bridge import compose_verl_config
    from self_model.template.chat_template import load_template

    cfg = make()
    run = train_grpo.main(cfg)
    config = compose_verl_config(command_args(run)[4:] + ["data.filter_overlong_prompts=true"])
    tokenizer = AutoTokenizer.from_pretrained(config.actor_rollout_ref.model.tokenizer_path)
    dataset = RLHFDataset(config.data.train_files, tokenizer, config.data)
    assert len(dataset) == 30
    item = dataset[0]
    assert item["raw_prompt"] == FIRST_PROMPT
    verl_ids = tokenizer.apply_chat_template(list(item["raw_prompt"]), add_generation_prompt=True, tokenize=True)
    verl_ids = verl_ids["input_ids"] if hasattr(verl_ids, "keys") else verl_ids
    assert list(verl_ids) == load_template(TEMPLATE).prompt_ids(tokenizer, list(item["raw_prompt"]))
    score = get_custom_reward_fn(config)
    # 33 characters against a budget of 4 x len("37") + 16 = 24: length_penalty -9/24, weighted 0.5
    result = score(data_source=item["data_source"], solution_str="37。" + "x" * 30,
                   ground_truth=item["reward_model"]["ground_truth"], extra_info=dict(item["extra_info"]))
    assert result == {"score": pytest.approx(0.5 * -9 / 24), "normalized_match": 0.0,
                      "length_penalty": pytest.approx(-9 / 24)}
    exact = score(data_source="d", solution_str="<answer>37</answer>", ground_truth="37", extra_info={})
    assert exact["normalized_match"] == 1.0 and exact["score"] == 1.0


def test_the_readme_documents_every_ppo_key() -> None:
    """Each ppo.* key in the schema appears in the README's key table."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    from self_model.rlhf.config import RewardSection, RLSection

    for f in dataclasses.fields(RLSection):
        if f.name != "reward" and f.init:  # reward: a section, its keys are checked below; init=False: not a key
            assert f"`ppo.{f.name}`" in readme or f"`ppo.{f.name}.*`" in readme, f.name
    for f in dataclasses.fields(RewardSection):
        assert f"`ppo.reward.{f.name}`" in readme, f.name
