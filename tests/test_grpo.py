"""GRPO with trl on the tiny model (CPU): LoRA from an SFT adapter and full training, the reference is the SFT model,
the reward rises on a toy reward, the prompt data and its length policy, bad input, and the README command."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_command
from rl_helpers import SAMPLES, make_sft_adapter, rl_config
from safetensors.torch import load_file

from self_model.core.errors import ConfigError, DataError
from self_model.rlhf.config import GRPOStageConfig, PPOStageConfig

train_grpo = pytest.importorskip("self_model.rlhf.train_grpo", reason="entry script importable")

# A few steps with short replies: 4 prompts x 2 replies a step, one optimizer step each.
SMALL = {"ppo.rollout_n": "2", "ppo.train_batch_size": "4", "ppo.ppo_mini_batch_size": "4",
         "ppo.ppo_micro_batch_size_per_gpu": "4", "ppo.total_training_steps": "2", "ppo.max_response_length": "8",
         "ppo.trl_args.save_steps": "2", "ppo.actor_lr": "5.0e-3"}
METRICS = ("reward", "reward_std", "kl", "completions/mean_length", "rewards/normalized_match/mean",
           "rewards/length_penalty/mean")


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sft_adapter(tiny_model_dir, tmp_path_factory.mktemp("sft") / "final")


@pytest.fixture
def make(tiny_model_dir: Path, sft_adapter: Path, tmp_path: Path):
    def build(overrides: dict[str, Any] | None = None, cls: type = GRPOStageConfig) -> Any:
        return rl_config(cls, tiny_model_dir, tmp_path / "run", sft_adapter, {**SMALL, **(overrides or {})})

    return build


def log_history(run: Path) -> list[dict[str, Any]]:
    state = max(run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    return json.loads(state.read_text())["log_history"]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


# ---- end to end ------------------------------------------------------------------------------------------------
def test_lora_grpo_from_an_sft_adapter(make: Any, sft_adapter: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    final = train_grpo.main(make())
    assert final is not None and final.name == "final"
    for name in ("adapter_model.safetensors", "tokenizer.json", "generation_config.json", "run_config.yaml",
                 "run_info.json", "data_report.json", "chat_template_source.json"):
        assert (final / name).is_file(), name
    assert not (final / "ref").exists()  # the frozen reference copy is the SFT adapter, not saved again
    report = json.loads((final / "data_report.json").read_text())
    assert report["reference"].startswith("stacked:") and report["data"]["train"]["prompts_out"] == 30
    train_logs = [e for e in log_history(final.parent) if "reward" in e]
    assert len(train_logs) == 2 and all(k in e and math.isfinite(e[k]) for e in train_logs for k in METRICS)
    assert all(0 < e["completions/mean_length"] <= 8 for e in train_logs)
    # At the first step the policy is the SFT model: a KL of ~0 means the reference is the SFT model too (base vs.
    # this SFT adapter differ by ~0.03 per token).
    assert abs(train_logs[0]["kl"]) < 1e-3
    for when in ("eval_before", "eval_after"):
        assert math.isfinite(report[when]["eval_reward"]) and "eval_completions/mean_length" in report[when]
    before, after = weights(sft_adapter), weights(final)
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    tokenizer = AutoTokenizer.from_pretrained(final)
    eos = GenerationConfig.from_pretrained(final).eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])


def test_reward_rises_with_full_training_from_a_merged_sft_adapter(make: Any, tmp_path: Path) -> None:
    """A toy reward the tiny model can learn (the share of ASCII characters in the reply), given by path:function;
    full training starts from base + SFT adapter merged, and the reference must be that merged SFT model."""
    toy = tmp_path / "toy_reward.py"
    toy.write_text("def ascii_share(data_source, solution_str, ground_truth, extra_info=None, **kwargs):\n"
                   "    text = solution_str.strip()\n"
                   "    return sum(c.isascii() for c in text) / max(len(text), 1)\n")
    cfg = make({"peft.enabled": "false", "ppo.reward.functions": f"[{toy}:ascii_share]", "ppo.reward.weights": "null",
                "ppo.rollout_n": "4", "ppo.train_batch_size": "8", "ppo.ppo_mini_batch_size": "8",
                "ppo.max_response_length": "16", "ppo.actor_lr": "1.0e-2", "ppo.total_training_steps": "null",
                "ppo.total_epochs": "3", "ppo.trl_args.save_steps": "100", "ppo.trl_args.eval_steps": "100"})
    final = train_grpo.main(cfg)
    report = json.loads((final / "data_report.json").read_text())
    assert report["reference"].startswith("merged:") and report["reference"].endswith("separate frozen copy")
    train_logs = [e for e in log_history(final.parent) if "reward" in e]
    assert abs(train_logs[0]["kl"]) < 1e-3 and train_logs[-1]["kl"] > 1e-2  # starts at the SFT model, moves away
    before, after = report["eval_before"]["eval_reward"], report["eval_after"]["eval_reward"]
    print(f"toy reward on the eval prompts: {before:.3f} before, {after:.3f} after {len(train_logs)} steps")
    assert after > before + 0.1
    assert (final / "model.safetensors").is_file()


def test_a_reward_model_scores_replies(make: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A sequence-classification reward model (one logit) next to a rule-based reward, weighted."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)
    torch.manual_seed(0)
    rm_dir = tmp_path / "tiny_rm"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(rm_dir)  # no chat_template: the policy's is used
    cfg = make({"ppo.reward.functions": "[format]", "ppo.reward.weights": "[1.0]",
                "ppo.reward.reward_model_name_or_path": str(rm_dir), "ppo.reward.reward_model_weight": "0.5",
                "ppo.total_training_steps": "1", "ppo.eval_file": "null"})
    final = train_grpo.main(cfg)
    (entry,) = [e for e in log_history(final.parent) if "reward" in e]
    rm_score = entry["rewards/tiny_rm/mean"]
    assert rm_score != 0.0 and entry["rewards/format/mean"] == 0.0
    assert entry["reward"] == pytest.approx(0.5 * rm_score, rel=1e-4, abs=1e-6)


def test_dry_run_trains_nothing(make: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make()
    assert train_grpo.main(cfg, dry_run=True) is None
    out = capsys.readouterr().out
    assert "reference:  stacked: GRPO keeps training the SFT adapter" in out
    assert "rewards:    1.0 x normalized_match + 0.5 x length_penalty" in out
    assert "4 prompts x 2 replies per step; optimizer step every 4 prompts = 4 per forward x 2 accumulation" in out
    assert "ground truth '37'" in out and out.rstrip().endswith("<|im_start|>assistant")
    assert not Path(cfg.output_dir).exists()


# ---- prompt data -------------------------------------------------------------------------------------------------
def test_prompt_formats_give_the_same_rows(tmp_path: Path, shared_data: Path) -> None:
    from self_model.core.prompt_rows import load_prompts

    rows = [{"question": "Q?", "answer": "A"}, {"prompt": "Q?", "ground_truth": "A"},
            {"prompt": [{"role": "user", "content": "Q?"}], "answer": "A"},
            {"messages": [{"role": "user", "content": "Q?"}], "ground_truth": "A"},
            {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}]}]
    for i, row in enumerate(rows):
        path = tmp_path / f"f{i}.jsonl"
        path.write_text(json.dumps(row) + "\n", encoding="utf-8")
        (got,) = load_prompts(str(path), system_prompt="Answer briefly.")
        assert got["messages"] == [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Q?"}]
        assert got["ground_truth"] == "A" and got["data_source"] == f"f{i}", row
    medicalgpt = load_prompts(str(shared_data / "grpo_sample.jsonl"))
    assert len(medicalgpt) == 32 and medicalgpt[0]["ground_truth"] == "食管克罗恩病"


def test_bad_prompt_rows_are_listed_with_file_and_line(tmp_path: Path) -> None:
    from self_model.core.prompt_rows import load_prompts

    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps({"question": "Q?"}), json.dumps({"question": "Q?", "answer": ""}),
                               json.dumps({"text": "x"}), "{broken",
                               json.dumps({"messages": [{"role": "user", "content": "Q"},
                                                        {"role": "assistant", "content": "A"}], "answer": "A"})]))
    with pytest.raises(DataError) as err:
        load_prompts(str(path))
    text = str(err.value)
    assert "5 problem(s)" in text and f"{path}:1: the row has no reference answer" in text
    assert f"{path}:2: 'answer' is empty" in text and f"{path}:3: unrecognised prompt row with keys ['text']" in text
    assert f"{path}:4: malformed JSON" in text and f"{path}:5: 'messages' ends with an assistant turn" in text


@pytest.mark.parametrize("policy", ["error", "drop"])
def test_prompts_over_max_prompt_length(make: Any, policy: str, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make({"ppo.max_prompt_length": "60", "ppo.prompt_truncation": policy})
    if policy == "error":
        with pytest.raises(DataError) as err:
            train_grpo.main(cfg, dry_run=True)
        text = str(err.value)
        over = re.findall(rf"{SAMPLES}/grpo_train.jsonl:(\d+) \((\d+) tokens\)", text)
        assert over and all(int(tokens) > 60 for _, tokens in over)
        assert f"{len(over)} of 30 prompts are longer than ppo.max_prompt_length = 60 tokens" in text
        assert "ppo.prompt_truncation: drop" in text
    else:
        train_grpo.main(cfg, dry_run=True)
        out = capsys.readouterr().out
        dropped = int(out.split("over max_prompt_length 60: ")[1].split(" dropped")[0])
        assert 0 < dropped < 30 and f"30 rows -> {30 - dropped} prompts" in out


# ---- bad input ------------------------------------------------------------------------------------------------
def problems(make: Any, overrides: dict[str, str], cls: type = GRPOStageConfig) -> str:
    with pytest.raises(ConfigError) as err:
        make(overrides, cls)
    return str(err.value)


def test_grpo_needs_two_replies_and_whole_batches(make: Any) -> None:
    text = problems(make, {"ppo.rollout_n": "1", "ppo.ppo_micro_batch_size_per_gpu": "3"})
    assert "ppo.rollout_n: GRPO needs at least 2 replies per prompt (got 1)" in text
    assert ("ppo.ppo_mini_batch_size x rollout_n = 4 x 1 = 4 replies must be a whole number of forward passes of "
            "ppo_micro_batch_size_per_gpu x processes = 3") in text
    text = problems(make, {"ppo.train_batch_size": "6"})
    assert "ppo.train_batch_size (6) must be a multiple of ppo_mini_batch_size (4)" in text


def test_fewer_prompts_than_one_step(make: Any) -> None:
    from self_model.core.errors import UserError

    with pytest.raises(UserError, match=r"ppo.train_batch_size is 32 prompts per step, but .* has 30 usable prompts"):
        train_grpo.main(make({"ppo.train_batch_size": "32", "ppo.ppo_mini_batch_size": "32"}), dry_run=True)


def test_reward_function_errors_name_the_file_and_line(make: Any, tmp_path: Path) -> None:
    broken, wrong = tmp_path / "broken.py", tmp_path / "wrong.py"
    broken.write_text("import math\n\nWEIGHT = math.nope\n")
    wrong.write_text("def score(completions, **kwargs):\n    return [1.0]\n")
    text = problems(make, {"ppo.reward.functions": f"[{broken}:f, {wrong}:score, {tmp_path}/none.py:f, exact]",
                           "ppo.reward.weights": "null"})
    assert f"ppo.reward.functions[2]: '{tmp_path}/none.py:f': file not found" in text
    assert "ppo.reward.functions[3]: unknown reward 'exact' (did you mean 'exact_match'?)" in text
    text = problems(make, {"ppo.reward.functions": f"[{broken}:f, {wrong}:score]", "ppo.reward.weights": "null"})
    assert f"ppo.reward.functions[0]: '{broken}:f' does not import: {broken}:3: AttributeError" in text
    assert f"ppo.reward.functions[1]: {wrong}:1: score(completions, **kwargs) has the wrong signature" in text


def test_trl_args_are_checked_against_grpo_config(make: Any) -> None:
    text = problems(make, {"ppo.trl_args.learning_rate": "1.0e-5", "ppo.trl_args.num_generatons": "4",
                           "ppo.trl_args.temperature": "hot"})
    assert "ppo.trl_args.learning_rate: set by this toolkit; use ppo.actor_lr instead" in text
    assert "ppo.trl_args.num_generatons: unknown GRPOConfig argument (did you mean 'num_generations'?)" in text
    assert "ppo.trl_args.temperature: expected a number, got 'hot'" in text


def test_ppo_on_trl_says_it_needs_verl(make: Any) -> None:
    import trl

    text = problems(make, {"ppo.backend": "trl"}, PPOStageConfig)
    assert f"ppo.backend: trl cannot run PPO: trl {trl.__version__} has no PPO trainer" in text
    assert "Set ppo.backend: verl (uv sync --extra rlhf" in text and "train_grpo.py" in text
    assert "ppo.prepare_only: only means something for ppo.backend: verl" in problems(
        make, {"ppo.prepare_only": "true"})


# ---- the commands a user types ---------------------------------------------------------------------------------
def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return run_command(["python", *args], timeout=600)


def test_readme_grpo_command(sft_adapter: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The README's GRPO command (the SFT result and the output folder moved out of the checkout)."""
    out = tmp_path / "grpo"
    result = run(["self_model/rlhf/train_grpo.py", "--config", "config/self_model_config/rlhf.yaml",
                  f"model_name_or_path={tiny_model_dir}", f"adapter_name_or_path={sft_adapter}",
                  f"tokenizer_name_or_path={sft_adapter}", f"ppo.output_dir={out}", "ppo.total_training_steps=1",
                  "ppo.trl_args.disable_tqdm=true"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"GRPO result saved to {out}/final" in result.stdout and "reference: stacked:" in result.stdout
    report = json.loads((out / "final" / "data_report.json").read_text())
    before, after = report["eval_before"]["eval_reward"], report["eval_after"]["eval_reward"]
    assert f"eval reward: {before:.4g} before training -> {after:.4g} after" in result.stdout
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_readme_ppo_command_writes_the_verl_job_here(sft_adapter: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The guide's PPO command on the shipped rlhf.yaml: ppo.backend auto sends PPO to verl; without verl or GPUs the
    complete verl job is written and the message says what to run where (exit 0, nothing trained)."""
    out = tmp_path / "ppo"
    result = run(["self_model/rlhf/train_ppo.py", "--config", "config/self_model_config/rlhf.yaml",
                  f"model_name_or_path={tiny_model_dir}", f"adapter_name_or_path={sft_adapter}",
                  f"tokenizer_name_or_path={sft_adapter}", f"ppo.output_dir={out}"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ppo.backend: auto -> verl for PPO" in result.stderr
    assert "verl cannot train here: verl is not installed in this environment" in result.stdout
    assert f"uv run --no-sync bash {out / 'verl_overrides.txt'}" in result.stdout
    command = (out / "verl_overrides.txt").read_text()
    assert "verl.trainer.main_ppo" in command and "algorithm.adv_estimator=gae" in command
    assert (out / "data" / "train.parquet").is_file() and not (out / "final").exists()


def test_guide_top_level_reward_model_is_used_as_ppo_reward(make: Any) -> None:
    """The original guide writes reward_model_name_or_path at the top level of rlhf.yaml."""
    cfg = make({"reward_model_name_or_path": "org/guide-rm", "ppo.reward.functions": "[]",
                "ppo.reward.weights": "null"})
    assert cfg.ppo.reward.reward_model_name_or_path == "org/guide-rm"
    assert "ppo.reward: name at least one reward" in problems(make, {"ppo.reward.functions": "[]",
                                                                     "ppo.reward.weights": "null"})
    text = problems(make, {"reward_model_name_or_path": "org/guide-rm",
                           "ppo.reward.reward_model_name_or_path": "org/other-rm"})
    assert "name different models; keep one" in text


def test_rollout_backend_is_read_by_trl_too(make: Any) -> None:
    """rollout_backend: hf (the guide's value) is what trl does; vllm is trl's use_vllm, refused without a GPU."""
    assert make({"ppo.rollout_backend": "hf"}).ppo.rollout_backend == "hf"
    assert make({}).ppo.rollout_backend == "hf"  # null: hf on trl
    if not (torch.cuda.is_available() and importlib.util.find_spec("vllm")):
        assert "ppo.rollout_backend: vllm with backend trl needs vLLM and a GPU" in problems(
            make, {"ppo.rollout_backend": "vllm"})
    assert "is not a rollout of backend trl" in problems(make, {"ppo.rollout_backend": "sglang"})
