"""PEFT variants through peft's own flags (README "PEFT variants"): DoRA, rsLoRA, PiSSA / OLoRA, LoftQ on QLoRA.

Each variant trains a few SFT steps through the entry script's `main(cfg)` on the tiny model and is merged by the
export tool, whose logit check (merged vs base + adapter) must pass. PiSSA trains on a residual base: the final/
adapter must give the trained model's outputs on the ORIGINAL base.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import ROOT

from self_model.core.config import load_config
from self_model.core.errors import ConfigError, UserError
from self_model.fine_tuning import train_finetune
from self_model.tools import export_model
from self_model.tools.export_config import ExportConfig

SHIPPED_EXPORT = yaml.safe_load((ROOT / "config" / "self_model_config" / "export.yaml").read_text(encoding="utf-8"))
IDS = torch.tensor([[5, 17, 42, 99, 230, 7, 64, 12]])


def train(sft_config: Any, tmp_path: Path, name: str, **peft: Any) -> Path:
    cfg = sft_config({"training_args.output_dir": str(tmp_path / name), "training_args.max_steps": 3,
                      "training_args.save_steps": 3, "training_args.learning_rate": 0.02, "data.eval_file": "null",
                      "data.max_samples": 12}, peft={"enabled": True, **peft})
    final = train_finetune.main(cfg)
    assert final is not None and (final / "adapter_config.json").is_file()
    return final


def export(final: Path, out: Path) -> dict[str, Any]:
    data = copy.deepcopy(SHIPPED_EXPORT)
    data.update(model_name_or_path=str(final), output_dir=str(out))
    export_model.main(load_config(ExportConfig, None, data=data))
    return json.loads((out / "export_report.json").read_text(encoding="utf-8"))


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def base_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [{"use_dora": True}, {"use_rslora": True, "lora_r": 16},
                                     {"init_lora_weights": "pissa"}])
def test_variant_trains_and_merges_with_the_logit_check(variant: dict[str, Any], sft_config: Any, tmp_path: Path,
                                                       tiny_model_dir: Path) -> None:
    from peft import PeftModel

    final = train(sft_config, tmp_path, "run", **variant)
    saved = json.loads((final / "adapter_config.json").read_text(encoding="utf-8"))
    assert saved["use_dora"] == variant.get("use_dora", False)
    assert saved["use_rslora"] == variant.get("use_rslora", False)
    if "init_lora_weights" in variant:  # converted for the original base: a plain LoRA of rank 2r
        assert saved["init_lora_weights"] is True and saved["r"] == 16
    trained = logits(PeftModel.from_pretrained(base_model(tiny_model_dir), str(final)))
    assert not torch.allclose(trained, logits(base_model(tiny_model_dir)), atol=1e-4)  # the adapter changed something
    report = export(final, tmp_path / "export")
    assert report["check"]["passed"] and report["check"]["max_abs_diff"] <= report["check"]["tolerance"]
    assert torch.allclose(logits(base_model(tmp_path / "export")), trained, atol=1e-4)


@pytest.mark.slow
def test_pissa_adapter_on_the_original_base_equals_the_trained_model(sft_config: Any, tmp_path: Path,
                                                                    tiny_model_dir: Path) -> None:
    """The trained model is the residual base + the adapter as trained (rebuilt from checkpoint-3 with the same
    PiSSA initialisation); final/ on the untouched base must compute the same, and the checkpoint must not."""
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from self_model.core.modeling import attach_adapter

    final = train(sft_config, tmp_path, "pissa", init_lora_weights="pissa_niter_4", lora_r=4, lora_alpha=8)
    checkpoint = final.parent / "checkpoint-3"
    as_trained = json.loads((checkpoint / "adapter_config.json").read_text(encoding="utf-8"))
    assert as_trained["init_lora_weights"] == "pissa_niter_4"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # what apply_peft does, so the fast SVD rebuilds the residual the run trained on
        residual = get_peft_model(base_model(tiny_model_dir), LoraConfig(
            r=4, lora_alpha=8, target_modules=as_trained["target_modules"], init_lora_weights="pissa_niter_4"))
    set_peft_model_state_dict(residual, load_file(str(checkpoint / "adapter_model.safetensors")))
    trained = logits(residual)
    on_original = logits(PeftModel.from_pretrained(base_model(tiny_model_dir), str(final)))
    assert torch.allclose(on_original, trained, atol=1e-4), (on_original - trained).abs().max()
    wrong = logits(PeftModel.from_pretrained(base_model(tiny_model_dir), str(checkpoint)))
    assert not torch.allclose(wrong, trained, atol=1e-3)  # unconverted, it would answer differently
    with pytest.raises(UserError, match="residual base"):
        attach_adapter(base_model(tiny_model_dir), str(checkpoint), trainable=False)


def test_loftq_without_a_gpu_is_refused_with_the_reason(sft_config: Any) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: LoftQ runs (test_loftq_on_qlora_...)")
    with pytest.raises(ConfigError, match="loftq needs a CUDA"):
        sft_config(peft={"enabled": True, "qlora": True, "init_lora_weights": "loftq"})


@pytest.mark.gpu
def test_loftq_on_qlora_starts_closer_to_the_full_precision_model(sft_config: Any, tmp_path: Path,
                                                                  tiny_model_dir: Path) -> None:
    from self_model.core.modeling import apply_peft, load_causal_lm

    cfg = sft_config(peft={"enabled": True, "qlora": True, "init_lora_weights": "loftq",
                           "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"]})
    reference = logits(base_model(tiny_model_dir))
    plain = apply_peft(load_causal_lm(cfg, torch.float32), replace(cfg.peft, init_lora_weights="default"))
    loftq = apply_peft(load_causal_lm(cfg, torch.float32), cfg.peft)
    error_plain = (logits(plain) - reference).abs().mean()
    error_loftq = (logits(loftq) - reference).abs().mean()
    assert error_loftq < error_plain, (error_loftq, error_plain)
    final = train(sft_config, tmp_path, "loftq", qlora=True, init_lora_weights="loftq")
    assert export(final, tmp_path / "export")["check"]["passed"]


@pytest.mark.parametrize(("peft", "message"), [
    ({"init_lora_weights": "pisa"}, "did you mean 'pissa'"),
    ({"init_lora_weights": "pissa", "qlora": True}, "full-precision"),
    ({"init_lora_weights": "olora", "use_dora": True}, "magnitudes"),
    ({"init_lora_weights": "pissa_niter_8", "modules_to_save": ["embed_tokens"]}, "modules_to_save"),
    ({"init_lora_weights": "loftq"}, "loftq needs qlora: true"),
    ({"enabled": False, "use_dora": True}, "need peft.enabled: true"),
])
def test_unsupported_combinations_are_refused_with_the_reason(peft: dict[str, Any], message: str,
                                                             sft_config: Any) -> None:
    with pytest.raises(ConfigError, match=message):
        sft_config(peft={"enabled": True, **peft})


def test_trl_stages_refuse_base_changing_inits(sft_config: Any, tiny_model_dir: Path) -> None:
    from self_model.core.modeling import lora_config

    cfg = sft_config(peft={"enabled": True, "init_lora_weights": "olora"})
    with pytest.raises(UserError, match="residual base"):
        lora_config(base_model(tiny_model_dir), cfg.peft)
    dora = sft_config(peft={"enabled": True, "use_dora": True, "use_rslora": True})
    config = lora_config(base_model(tiny_model_dir), dora.peft)
    assert config.use_dora and config.use_rslora and config.init_lora_weights is True
    # ... and the user hears it when the config loads, before any weights (DPO and GRPO read the same rlhf.yaml).
    from rl_helpers import rl_config

    from self_model.rlhf.config import DPOStageConfig, GRPOStageConfig

    for cls in (DPOStageConfig, GRPOStageConfig):
        with pytest.raises(ConfigError, match="not offered where trl wraps the model"):
            rl_config(cls, tiny_model_dir, ROOT / "unused", overrides={"peft.init_lora_weights": "pissa"})


def test_dry_run_counts_a_variant_without_loading_weights(sft_config: Any, capsys: pytest.CaptureFixture) -> None:
    train_finetune.main(sft_config(peft={"enabled": True, "init_lora_weights": "pissa", "use_rslora": True}),
                        dry_run=True)
    assert "(LoRA with rsLoRA, init pissa); trainable" in capsys.readouterr().out


def test_base_changing_inits_are_refused_with_sharded_weights(sft_config: Any) -> None:
    zero3 = str(ROOT / "config" / "self_model_config" / "deepspeed" / "ds_zero3.json")
    with pytest.raises(ConfigError, match="ZeRO-3 / FSDP shard"):
        sft_config({"training_args.deepspeed": zero3}, peft={"enabled": True, "init_lora_weights": "olora"})
