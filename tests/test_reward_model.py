"""The reward-model stage on the tiny model (CPU): LoRA from an SFT adapter (saved merged) and full training, pairwise
accuracy and margin on the eval pairs rise, final/ loads as a sequence classifier whose chat template renders what it
was trained on, GRPO scores replies with it, and a folder that is not a classifier is refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from rl_helpers import SAMPLES, TEMPLATE, make_sft_adapter, rl_config

from self_model.core.config import load_config
from self_model.core.errors import ConfigError
from self_model.rlhf.config import GRPOStageConfig
from self_model.rlhf.reward.config import RewardStageConfig

train_reward = pytest.importorskip("self_model.rlhf.train_reward", reason="entry script importable")
ROOT = Path(__file__).resolve().parents[1]
SHIPPED = yaml.safe_load((ROOT / "config" / "self_model_config" / "reward.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sft_adapter(tiny_model_dir, tmp_path_factory.mktemp("sft") / "final")


def reward_config(tiny_model_dir: Path, output_dir: Path, adapter: Path | None = None,
                  overrides: dict[str, Any] | None = None) -> RewardStageConfig:
    """The shipped reward.yaml pointed at the tiny model (and an SFT adapter), the sample pairs and a temp folder."""
    data = copy.deepcopy(SHIPPED)
    data.update(model_name_or_path=str(tiny_model_dir), template_path=str(TEMPLATE),
                tokenizer_name_or_path=str(adapter or tiny_model_dir),
                adapter_name_or_path=str(adapter) if adapter else None)
    data["data"].update(train_file=str(SAMPLES / "dpo_train.jsonl"), eval_file=str(SAMPLES / "dpo_eval.jsonl"))
    data["training_args"].update(output_dir=str(output_dir), disable_tqdm=True)
    return load_config(RewardStageConfig, None, [f"{k}={v}" for k, v in (overrides or {}).items()], data=data)


@pytest.fixture(scope="module")
def lora_reward_run(tiny_model_dir: Path, sft_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA reward model trained from the SFT adapter (merged into the start), as the shipped YAML does."""
    final = train_reward.main(reward_config(tiny_model_dir, tmp_path_factory.mktemp("rm") / "run", sft_adapter,
                                            {"training_args.num_train_epochs": "2"}))
    assert final is not None
    return final


@pytest.mark.slow
def test_lora_reward_model_learns_the_pairs_and_saves_a_classifier(lora_reward_run: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from self_model.rlhf.dpo.data import encode_pair
    from self_model.template.chat_template import load_template

    final = lora_reward_run
    results = json.loads((final / "eval_results.json").read_text())
    before, after = results["before"], results["after"]
    print(f"reward model (LoRA) on {results['eval_pairs']} eval pairs: accuracy {before['accuracy']:.3f} -> "
          f"{after['accuracy']:.3f}, margin {before['margin']:.3f} -> {after['margin']:.3f}")
    assert results["eval_pairs"] == 8
    assert after["accuracy"] > before["accuracy"] and after["accuracy"] >= 0.75
    assert after["margin"] > before["margin"] + 0.1
    # Saved merged: full weights a reward-model loader reads, no adapter.
    assert not (final / "adapter_config.json").exists() and (final / "model.safetensors").is_file()
    info = json.loads((final / "run_info.json").read_text())
    assert info["stage"] == "reward" and info["start"]["merged"]  # the SFT adapter merged into the start
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert model.config.num_labels == 1 and model.config.architectures == ["Qwen2ForSequenceClassification"]
    # The chat template saved with it renders exactly the sequence it was trained on (GRPO and verl render this way).
    tokenizer = AutoTokenizer.from_pretrained(final)
    pair = {"prompt": [{"role": "user", "content": "发烧了可以喝酒发汗吗？"}],
            "chosen": {"role": "assistant", "content": "不可以，请多喝水、多休息。"},
            "rejected": {"role": "assistant", "content": "可以，喝点白酒。"}}
    prompt, chosen, rejected = encode_pair(tokenizer, load_template(TEMPLATE), pair)
    rendered = tokenizer.apply_chat_template(pair["prompt"] + [pair["chosen"]], tokenize=True, return_dict=True)
    closing = train_reward.closing_ids(tokenizer, load_template(TEMPLATE))
    assert rendered["input_ids"] == prompt + chosen + closing
    with torch.no_grad():
        scores = [model(torch.tensor([prompt + reply + closing])).logits[0, 0] for reply in (chosen, rejected)]
    assert scores[0] > scores[1]


def test_grpo_scores_replies_with_the_trained_reward_model(lora_reward_run: Path, tiny_model_dir: Path,
                                                         tmp_path: Path) -> None:
    """rlhf.yaml's ppo.reward.reward_model_name_or_path at the reward run's folder: GRPO (trl) loads its final/."""
    train_grpo = pytest.importorskip("self_model.rlhf.train_grpo")
    run = lora_reward_run.parent
    cfg = rl_config(GRPOStageConfig, tiny_model_dir, tmp_path / "grpo", None, {
        "ppo.reward.functions": "[]", "ppo.reward.weights": "null", "ppo.reward.reward_model_name_or_path": str(run),
        "ppo.rollout_n": "2", "ppo.train_batch_size": "2", "ppo.ppo_mini_batch_size": "2",
        "ppo.ppo_micro_batch_size_per_gpu": "2", "ppo.total_training_steps": "1", "ppo.max_response_length": "4",
        "ppo.eval_file": "null", "peft.enabled": "true"})
    final = train_grpo.main(cfg)
    state = max(final.parent.glob("checkpoint-*/trainer_state.json"))
    (entry,) = [e for e in json.loads(state.read_text())["log_history"] if "reward" in e]
    scored = [k for k in entry if k.startswith("rewards/") and k.endswith("/mean")]
    assert len(scored) == 1 and entry[scored[0]] != 0.0 and entry["reward"] == pytest.approx(entry[scored[0]])


def test_verl_gets_the_reward_models_final_folder(lora_reward_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from self_model.rlhf.config import PPOStageConfig
    from self_model.rlhf.ppo_grpo.verl_bridge import verl_overrides

    cfg = rl_config(PPOStageConfig, tiny_model_dir, tmp_path / "ppo", None, {
        "ppo.reward.functions": "[]", "ppo.reward.weights": "null",
        "ppo.reward.reward_model_name_or_path": str(lora_reward_run.parent)})
    overrides = dict(o.split("=", 1) for o in verl_overrides(cfg, tmp_path / "ppo", "/tok", True))
    assert overrides["reward.reward_model.enable"] == "true"
    assert overrides["reward.reward_model.model_path"] == str(lora_reward_run.resolve())


@pytest.mark.slow
def test_full_reward_model_learns_the_pairs(tiny_model_dir: Path, tmp_path: Path) -> None:
    final = train_reward.main(reward_config(tiny_model_dir, tmp_path / "run", overrides={
        "peft.enabled": "false", "training_args.learning_rate": "1.0e-3", "training_args.num_train_epochs": "1"}))
    results = json.loads((final / "eval_results.json").read_text())
    before, after = results["before"], results["after"]
    print(f"reward model (full) accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, margin "
          f"{before['margin']:.3f} -> {after['margin']:.3f}")
    assert after["accuracy"] > before["accuracy"] and after["margin"] > before["margin"]


# ---- bad input -------------------------------------------------------------------------------------------------
def problems(build: Any) -> str:
    with pytest.raises(ConfigError) as err:
        build()
    return str(err.value)


def test_a_folder_that_is_not_a_classifier_is_refused(tiny_model_dir: Path, sft_adapter: Path, tmp_path: Path) -> None:
    """A causal LM (an SFT / DPO result) would load as a classifier with a random head: refused at the YAML key."""
    def grpo(path: Path | str, key: str = "ppo.reward.reward_model_name_or_path") -> Any:
        return lambda: rl_config(GRPOStageConfig, tiny_model_dir, tmp_path / "g", None,
                                 {"ppo.reward.functions": "[]", "ppo.reward.weights": "null", key: str(path)})

    text = problems(grpo(tiny_model_dir))
    assert f"ppo.reward.reward_model_name_or_path: {tiny_model_dir} is not a sequence-classification reward" in text
    assert "['Qwen2ForCausalLM']" in text and "self_model/rlhf/train_reward.py" in text
    assert "is a LoRA adapter (task_type CAUSAL_LM)" in problems(grpo(sft_adapter))
    assert "reward_model_name_or_path: " in problems(grpo(tiny_model_dir, "reward_model_name_or_path"))
    from transformers import AutoConfig

    AutoConfig.from_pretrained(tiny_model_dir, num_labels=3, architectures=["Qwen2ForSequenceClassification"]) \
        .save_pretrained(tmp_path / "three")
    assert "is a classifier with 3 labels" in problems(grpo(tmp_path / "three"))


def test_reward_yaml_dry_run_and_refusals(tiny_model_dir: Path, sft_adapter: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = reward_config(tiny_model_dir, tmp_path / "run", sft_adapter)
    assert cfg.start_adapter == "merge"
    assert train_reward.main(cfg, dry_run=True) is None
    out = capsys.readouterr().out
    assert "+ a new one-score head (LoRA, saved merged reward model)" in out and "40 pairs" in out
    assert "<|im_end|>" in out and not (tmp_path / "run").exists()
    assert "start_adapter: continue would keep training the SFT adapter" in problems(
        lambda: reward_config(tiny_model_dir, tmp_path / "r", sft_adapter, {"start_adapter": "continue"}))
    text = problems(lambda: reward_config(tiny_model_dir, tmp_path / "r", None, {
        "training_args.max_length": "64", "training_args.center_reward_coefficient": "0.1"}))
    assert "training_args.max_length" in text and "data.max_length" in text
    assert "did you mean 'center_rewards_coefficient'" in text
