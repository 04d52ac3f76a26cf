"""Strict config loading: every shipped YAML loads; every mistake is reported at once with its YAML path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from self_model.core.config import load_config, redact
from self_model.core.errors import ConfigError
from self_model.core.tracking import SwanlabTraceConfig, WandbTraceConfig
from self_model.fine_tuning.config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]


def _problems(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    return "\n".join(exc.value.problems)


def test_shipped_finetune_yaml_loads(tiny_model_dir: Path, finetune_yaml: dict) -> None:
    data = dict(finetune_yaml, model_name_or_path=str(tiny_model_dir), tokenizer_name_or_path=str(tiny_model_dir))
    cfg = load_config(FinetuneConfig, None, data=data)
    assert cfg.peft.enabled and cfg.peft.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.training_args["fp16"] is True
    assert cfg.data.train_file.endswith("sft_train.jsonl")


@pytest.mark.parametrize("name,cls", [("wandb.yaml", WandbTraceConfig), ("swanlab.yaml", SwanlabTraceConfig)])
def test_shipped_trace_yamls_load(name: str, cls: type) -> None:
    cfg = load_config(cls, ROOT / "config" / "trace_config" / name)
    assert cfg.mode == "auto" and cfg.api_key is None


def test_issue_shape_loads_with_hub_ids(tmp_path: Path) -> None:
    """The exact layout users already have (hub ids, trace: swanlab, 5.0e-5) loads."""
    train = tmp_path / "train.jsonl"
    train.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    text = f"""
model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct
tokenizer_name_or_path: Qwen/Qwen2.5-0.5B-Instruct
template_path: {ROOT}/self_model/template/qwen2_chatml.json
data: {{train_file: {train}, eval_file: {train}, max_length: 512}}
peft: {{enabled: true, lora_r: 8, lora_alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj]}}
trace: swanlab
training_args: {{output_dir: self_model/checkpoints/finetune, per_device_train_batch_size: 2,
                gradient_accumulation_steps: 4, learning_rate: 5.0e-5, num_train_epochs: 1, fp16: true}}
"""
    path = tmp_path / "finetune.yaml"
    path.write_text(text)
    cfg = load_config(FinetuneConfig, path)
    assert cfg.trace == "swanlab" and cfg.training_args["learning_rate"] == 5.0e-5


def test_every_mistake_reported_at_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny_model_dir),
        "data": {"train_file": str(tmp_path / "missing.jsonl"), "max_lenght": 512},
        "peft": {"lora_rr": 8, "enabled": "yes"},
        "trace": "swanlabb",
        "training_args": {"output_dir": str(tmp_path / "out"), "learning_rate": "fast", "warmup_ratio": 0.1,
                          "evaluation_strategy": "steps", "per_device_train_batch_sise": 2},
        "tempalte_path": "x.json",
    }))
    with pytest.raises(ConfigError) as exc:
        load_config(FinetuneConfig, path)
    text = _problems(exc)
    assert str(path) in str(exc.value)
    assert "data.max_lenght: unknown key (did you mean 'max_length'?)" in text
    assert "peft.lora_rr: unknown key (did you mean 'lora_r'?)" in text
    assert "peft.enabled: expected true or false, got 'yes'" in text
    assert "trace: 'swanlabb' is not allowed" in text and "did you mean 'swanlab'" in text
    assert "tempalte_path: unknown key (did you mean 'template_path'?)" in text
    assert f"data.train_file: file not found: {tmp_path / 'missing.jsonl'}" in text
    assert "training_args.learning_rate: expected a number, got 'fast'" in text
    assert "training_args.warmup_ratio: not an argument of TrainingArguments any more; use warmup_steps" in text
    assert ("training_args.evaluation_strategy: not an argument of TrainingArguments any more; "
            "use eval_strategy") in text
    assert ("training_args.per_device_train_batch_sise: unknown TrainingArguments argument "
            "(did you mean 'per_device_train_batch_size'?)") in text
    assert len(exc.value.problems) == 10  # every planted mistake, each once, nothing else


def test_training_args_checked_against_transformers(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = {"model_name_or_path": str(tiny_model_dir), "data": {"train_file": __file__},
            "training_args": {"output_dir": str(tmp_path), "learning_rate": "fast", "warmup_ratio": 0.1,
                              "evaluation_strategy": "steps", "per_device_train_batch_sise": 2,
                              "report_to": ["wandb"]}}
    with pytest.raises(ConfigError) as exc:
        load_config(FinetuneConfig, None, data=data)
    text = _problems(exc)
    assert "training_args.learning_rate: expected a number, got 'fast'" in text
    assert "training_args.warmup_ratio" in text and "warmup_steps" in text
    assert "training_args.evaluation_strategy" in text and "eval_strategy" in text
    assert "did you mean 'per_device_train_batch_size'" in text
    assert "training_args.report_to: set by this toolkit; use trace:" in text


def test_missing_required_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(FinetuneConfig, None, data={"data": {"train_file": str(tmp_path / "nope.jsonl")},
                                                "training_args": {}})
    text = _problems(exc)
    assert "model_name_or_path: required key is missing" in text
    assert "data.train_file: file not found" in text
    assert "training_args.output_dir: required key is missing" in text


def test_missing_local_model_says_how_to_build_tiny(tmp_path: Path) -> None:
    data = {"model_name_or_path": "self_model/checkpoints/no_such_tiny", "data": {"train_file": __file__},
            "training_args": {"output_dir": str(tmp_path)}}
    with pytest.raises(ConfigError, match="make_tiny_model.py --output self_model/checkpoints/no_such_tiny"):
        load_config(FinetuneConfig, None, data=data)


def test_overrides_and_yaml11_numbers(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = {"model_name_or_path": str(tiny_model_dir), "data": {"train_file": __file__},
            "training_args": {"output_dir": str(tmp_path), "learning_rate": "5e-5"}}
    cfg = load_config(FinetuneConfig, None, ["training_args.num_train_epochs=2", "peft.enabled=true",
                                             "peft.target_modules=[q_proj, v_proj]", "data.max_length=64"], data=data)
    assert cfg.training_args["learning_rate"] == 5e-5  # YAML 1.1 reads 5e-5 as a string: converted
    assert cfg.training_args["num_train_epochs"] == 2
    assert cfg.peft.enabled and cfg.peft.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.max_length == 64
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(FinetuneConfig, None, ["peft.enabled"], data=data)


def test_cross_field_checks(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = {"model_name_or_path": str(tiny_model_dir), "data": {"train_file": __file__},
            "peft": {"qlora": True}, "training_args": {"output_dir": str(tmp_path)}}
    with pytest.raises(ConfigError, match="peft.qlora: true needs peft.enabled: true"):
        load_config(FinetuneConfig, None, data=data)


def test_bad_yaml_syntax_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model_name_or_path: x\ndata: {train_file: [\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: not valid YAML"):
        load_config(FinetuneConfig, path)


def test_redact_hides_secrets() -> None:
    out = redact({"api_key": "sk-123", "nested": {"hub_token": "hf_x", "project": "p"}, "empty_token": None})
    assert out == {"api_key": "***", "nested": {"hub_token": "***", "project": "p"}, "empty_token": None}


def test_yaml_no_for_a_strategy_means_the_string_no(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = {"model_name_or_path": str(tiny_model_dir), "data": {"train_file": __file__},
            "training_args": {"output_dir": str(tmp_path), "eval_strategy": False, "save_strategy": "steps"}}
    cfg = load_config(FinetuneConfig, None, data=data)
    assert cfg.training_args["eval_strategy"] == "no" and cfg.training_args["save_strategy"] == "steps"
