"""End-to-end DPO on the tiny model: LoRA from an SFT adapter, QLoRA, full; the reference is the SFT model when an
adapter is given; reward accuracy rises on a toy preference set; the README command as a subprocess."""

from __future__ import annotations

import copy
import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import run_command
from safetensors.torch import load_file

from self_model.core.config import load_config
from self_model.rlhf.config import DPOStageConfig

train_dpo = pytest.importorskip("self_model.rlhf.train_dpo", reason="entry script importable")

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data_process" / "sample_data"
TEMPLATE = ROOT / "self_model" / "template" / "qwen2_chatml.json"
DPO_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SFT result as train_finetune.py writes it (adapter + tokenizer with the template's chat_template),
    with random, non-zero LoRA weights so that the SFT model clearly differs from the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from self_model.template.chat_template import load_template

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    out = tmp_path_factory.mktemp("sft") / "final"
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    load_template(TEMPLATE).apply_to_tokenizer(tokenizer)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def dpo_config(tiny_model_dir: Path, tmp_path: Path):
    """Build an DPOStageConfig from the shipped YAML pointed at the tiny model, an SFT adapter and a temp folder."""
    shipped = yaml.safe_load((ROOT / "config" / "self_model_config" / "rlhf.yaml").read_text(encoding="utf-8"))

    def make(overrides: dict[str, Any] | None = None, adapter: Path | None = None) -> DPOStageConfig:
        data = copy.deepcopy(shipped)
        data.update(model_name_or_path=str(tiny_model_dir), template_path=str(TEMPLATE),
                    tokenizer_name_or_path=str(adapter or tiny_model_dir))
        data["adapter_name_or_path"] = str(adapter) if adapter else None
        data["data"].update(train_file=str(SAMPLES / "dpo_train.jsonl"), eval_file=str(SAMPLES / "dpo_eval.jsonl"))
        data["training_args"].update(output_dir=str(tmp_path / "run"), max_steps=4, logging_steps=1, save_steps=2,
                                     eval_steps=2, per_device_train_batch_size=4, learning_rate=5.0e-3,
                                     disable_tqdm=True)
        return load_config(DPOStageConfig, None, [f"{k}={v}" for k, v in (overrides or {}).items()], data=data)

    return make


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def log_history(run: Path) -> list[dict[str, Any]]:
    state = max(run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    return json.loads(state.read_text())["log_history"]


def check_final(final: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer, GenerationConfig

    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "run_config.yaml",
                 "run_info.json", "chat_template_source.json", "data_report.json"):
        assert (final / name).is_file(), name
    tokenizer = AutoTokenizer.from_pretrained(final)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    eos = GenerationConfig.from_pretrained(final).eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    return json.loads((final / "data_report.json").read_text())


# ---- end to end ------------------------------------------------------------------------------------------
def test_lora_dpo_from_an_sft_adapter(dpo_config: Any, sft_adapter: Path) -> None:
    final = train_dpo.main(dpo_config(adapter=sft_adapter))
    assert final is not None and final == Path(final).parent / "final"
    report = check_final(final)
    assert report["reference"].startswith("stacked:") and report["train_data"]["pairs_out"] == 40
    history = log_history(final.parent)
    train_logs = [e for e in history if "loss" in e]
    assert len(train_logs) == 4 and all(math.isfinite(e["loss"]) for e in train_logs)
    assert all(key in train_logs[-1] for key in DPO_METRICS)
    evals = [e for e in history if "eval_loss" in e]
    assert evals and all(f"eval_{key}" in evals[-1] for key in DPO_METRICS[1:])
    assert not any("eval_perplexity" in e for e in history)  # exp(DPO loss) is not a perplexity
    assert any("tokens_per_second" in e for e in train_logs)
    # One adapter, the continued SFT adapter: same shape, moved by DPO; the frozen reference copy is not saved.
    assert not (final / "ref").exists()
    before, after = weights(sft_adapter), weights(final)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == json.loads((sft_adapter / "adapter_config.json").read_text())[
        "base_model_name_or_path"]


def test_qlora_dpo_on_cpu_from_an_sft_adapter_with_precomputed_reference(dpo_config: Any, sft_adapter: Path) -> None:
    cfg = dpo_config({"peft.qlora": "true", "training_args.precompute_ref_log_probs": "true"}, adapter=sft_adapter)
    final = train_dpo.main(cfg)
    report = check_final(final)
    assert report["reference"].startswith("stacked:") and "precompute_ref_log_probs" in report["reference"]
    losses = [e["loss"] for e in log_history(final.parent) if "loss" in e]
    assert losses and all(math.isfinite(x) for x in losses)
    adapter = weights(final)
    assert adapter and any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())


def test_dry_run_trains_nothing(dpo_config: Any, sft_adapter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = dpo_config(adapter=sft_adapter)
    assert train_dpo.main(cfg, dry_run=True) is None
    out = capsys.readouterr().out
    assert "reference:  stacked:" in out and "40 rows -> 40 pairs" in out and "truncated 0" in out
    assert "<|im_start|>assistant\n[[" in out and "<|im_end|>]]   <- chosen" in out
    assert not Path(cfg.training_args["output_dir"]).exists()


def test_full_dpo_with_a_separate_frozen_reference(dpo_config: Any, tiny_model_dir: Path) -> None:
    final = train_dpo.main(dpo_config({"peft.enabled": "false", "training_args.learning_rate": "1.0e-3"}))
    report = check_final(final)
    assert report["reference"].endswith("kept as a separate frozen copy")
    before, after = weights(tiny_model_dir), weights(final)
    assert any("q_proj" in k and not torch.equal(before[k], after[k]) for k in before if k in after)


# ---- the reference is the SFT model ----------------------------------------------------------------------
def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the log-probs of the completion tokens, computed independently of trl."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = logits[:, :-1].float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (logps * batch["completion_mask"][:, 1:]).sum(-1)


def build_trainer(cfg: DPOStageConfig) -> tuple[Any, Any, str]:
    from self_model.core.modeling import load_tokenizer
    from self_model.rlhf.dpo.data import build_preference_dataset
    from self_model.rlhf.dpo.trainer import build_dpo_trainer, dpo_training_args, load_dpo_models
    from self_model.template.resolve import resolve_template

    args = dpo_training_args(cfg)
    tokenizer = load_tokenizer(cfg)
    template = resolve_template(cfg, tokenizer)
    train, _ = build_preference_dataset(cfg.data.train_file, tokenizer, template, cfg.data)
    models = load_dpo_models(cfg, tokenizer, args)
    trainer = build_dpo_trainer(cfg, models, tokenizer, args, train, None)
    return trainer, trainer.data_collator([train[i] for i in range(4)]), models.reference


def reference_logps(trainer: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What trl uses as the reference log-probs of the batch (chosen rows first, then rejected)."""
    with torch.no_grad():
        chosen, rejected = trainer.compute_ref_log_probs(trainer.ref_model or trainer.model, batch)
    return torch.cat([chosen, rejected])


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_reference_is_the_sft_model(dpo_config: Any, sft_adapter: Path, tiny_model_dir: Path, mode: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    overrides = {"training_args.eval_strategy": "'no'", "training_args.save_strategy": "'no'"}
    if mode == "full":
        overrides.update({"peft.enabled": "false", "training_args.learning_rate": "1.0e-3"})
    trainer, batch, reference = build_trainer(dpo_config(overrides, adapter=sft_adapter))
    assert reference.startswith("stacked:" if mode == "lora" else "merged:")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                    sft_adapter).eval()
    sft_logps, base_logps = sequence_logps(sft, batch), sequence_logps(base, batch)
    assert not torch.allclose(sft_logps, base_logps, atol=1e-2)  # the SFT adapter matters
    torch.testing.assert_close(reference_logps(trainer, batch), sft_logps, atol=1e-4, rtol=1e-5)
    trainer.train()
    # Training moved the policy but not the reference: it is still the SFT model.
    torch.testing.assert_close(reference_logps(trainer, batch), sft_logps, atol=1e-4, rtol=1e-5)


# ---- reward accuracy rises above chance ------------------------------------------------------------------
def test_reward_accuracy_rises_on_a_toy_preference_set(dpo_config: Any, tmp_path: Path) -> None:
    """Chosen is always the same polite answer, rejected always the same curt one: DPO must learn to prefer it."""
    def write(name: str, questions: range) -> str:
        rows = [{"conversations": [{"from": "human", "value": f"问题{i}：我头疼，怎么办？"}],
                 "chosen": "请多休息，多喝水，必要时就医。", "rejected": "不知道。"} for i in questions]
        path = tmp_path / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return str(path)

    cfg = dpo_config({"data.train_file": write("toy_train.jsonl", range(32)),
                      "data.eval_file": write("toy_eval.jsonl", range(100, 108)),
                      "training_args.max_steps": "16", "training_args.eval_steps": "16",
                      "training_args.save_steps": "16", "training_args.learning_rate": "1.0e-2"})
    final = train_dpo.main(cfg)
    history = log_history(final.parent)
    evals = [e for e in history if "eval_rewards/accuracies" in e]
    first_train = next(e for e in history if "rewards/accuracies" in e)
    # At the first step policy == reference: every reward is 0, so no pair is ranked right yet.
    assert first_train["rewards/margins"] == 0.0 and first_train["rewards/accuracies"] == 0.0
    print(f"toy set: first train step accuracy {first_train['rewards/accuracies']}, eval after 16 steps "
          f"accuracy {evals[-1]['eval_rewards/accuracies']}, margin {evals[-1]['eval_rewards/margins']:.3f}")
    assert evals[-1]["eval_rewards/accuracies"] > 0.5 and evals[-1]["eval_rewards/margins"] > 0
    report = json.loads((final / "data_report.json").read_text())
    assert report["eval"]["eval_rewards/accuracies"] == evals[-1]["eval_rewards/accuracies"]
    # Measured independently of trl on the saved result: the implicit reward log pi/pi_ref of the polite reply
    # beats the curt one on a new question (this fails if chosen and rejected were swapped anywhere).
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from self_model.template.chat_template import load_template

    tokenizer, template = AutoTokenizer.from_pretrained(final), load_template(TEMPLATE)
    policy = AutoPeftModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, dtype=torch.float32).eval()

    def reward(reply: str) -> float:
        ids, labels = template.encode(tokenizer, [{"role": "user", "content": "问题999：我头疼，怎么办？"},
                                                  {"role": "assistant", "content": reply}])
        batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                 "completion_mask": torch.tensor([[int(label != -100) for label in labels]])}
        return (sequence_logps(policy, batch) - sequence_logps(reference, batch)).item()

    assert reward("请多休息，多喝水，必要时就医。") > reward("不知道。")


# ---- the commands a user types ---------------------------------------------------------------------------
def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return run_command(["python", *args], timeout=600)


def test_readme_dpo_command(sft_adapter: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The README's DPO command (the SFT result and the output folder moved out of the checkout)."""
    out = tmp_path / "dpo"
    result = run(["self_model/rlhf/train_dpo.py", "--config", "config/self_model_config/rlhf.yaml",
                  f"model_name_or_path={tiny_model_dir}", f"adapter_name_or_path={sft_adapter}",
                  f"tokenizer_name_or_path={sft_adapter}", f"training_args.output_dir={out}",
                  "training_args.max_steps=2", "training_args.eval_steps=2", "training_args.disable_tqdm=true"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"DPO result saved to {out}/final" in result.stdout and "reference: stacked:" in result.stdout
    assert "reference model: stacked:" in result.stderr  # the log says it too
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_unknown_loss_type_exits_nonzero_listing_the_valid_ones() -> None:
    from self_model.rlhf.config import dpo_loss_types

    result = run(["self_model/rlhf/train_dpo.py", "--config", "config/self_model_config/rlhf.yaml",
                  "loss_type=dpo_classic"])
    assert result.returncode == 2 and "loss_type: unknown loss type 'dpo_classic'" in result.stderr
    assert str(dpo_loss_types()) in result.stderr and "saved to" not in result.stdout
