"""End-to-end SFT on the tiny model: full, LoRA and QLoRA; run folder rules; tracking offline."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from self_model.core.errors import UserError

train_finetune = pytest.importorskip("self_model.fine_tuning.train_finetune", reason="entry script importable")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _losses(run: Path) -> list[float]:
    state = json.loads(max(run.glob("checkpoint-*/trainer_state.json"), key=lambda p: p.stat().st_mtime).read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def _check_final(final: Path, tokenizer_eot: str = "<|im_end|>") -> None:
    from transformers import AutoTokenizer, GenerationConfig

    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "run_config.yaml",
                 "run_info.json", "chat_template_source.json", "data_report.json"):
        assert (final / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(final)
    gen = GenerationConfig.from_pretrained(final)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tok.convert_tokens_to_ids(tokenizer_eot) in eos
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and prompt.startswith("<|im_start|>system\n")
    info = json.loads((final / "run_info.json").read_text())
    assert "transformers" in info["versions"] and "torch" in info["versions"]


def test_full_finetune(sft_config: Any, tiny_model_dir: Path) -> None:
    cfg = sft_config({"peft.enabled": "false", "training_args.learning_rate": "1.0e-3"})
    final = train_finetune.main(cfg)
    assert final is not None and final.name == "final"
    _check_final(final)
    losses = _losses(final.parent)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    before, after = _weights(tiny_model_dir), _weights(final)
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert any("q_proj" in k for k in changed) and any("mlp" in k for k in changed)
    config = json.loads((final / "config.json").read_text())
    assert config["use_cache"] is True  # turned back on for generation
    # Checkpoints are written during training, and the eval loop logged perplexity.
    assert (final.parent / "checkpoint-2").is_dir() and (final.parent / "checkpoint-4").is_dir()
    state = json.loads((final.parent / "checkpoint-4" / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_loss" in e]
    assert evals and math.isclose(evals[-1]["eval_perplexity"], math.exp(evals[-1]["eval_loss"]), rel_tol=1e-6)
    assert any("tokens_per_second" in e for e in state["log_history"])


def test_lora_finetune_saves_adapter(sft_config: Any, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = sft_config({"training_args.learning_rate": "5.0e-3"})
    final = train_finetune.main(cfg)
    _check_final(final)
    adapter = _weights(final)
    assert adapter and all("lora_" in k for k in adapter)
    # LoRA B starts at zero; training moved it.
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    assert not (final / "model.safetensors").exists()
    # The adapter loads with peft onto the base, with exactly the trained weights.
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final)
    state = {k.replace(".default", ""): v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert len(state) == len(adapter)
    assert all(torch.equal(state[k], v) for k, v in adapter.items()), sorted(set(adapter) - set(state))[:3]


def test_qlora_finetune_on_cpu(sft_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import bitsandbytes as bnb

    loaded: list[Any] = []
    load = train_finetune.load_model_for_training
    monkeypatch.setattr(train_finetune, "load_model_for_training", lambda *a, **k: loaded.append(load(*a, **k))
                        or loaded[-1])
    cfg = sft_config({"peft.qlora": "true", "training_args.learning_rate": "5.0e-3"})
    final = train_finetune.main(cfg)
    # QLoRA: the base's linear layers (under the LoRA ones, and the untargeted MLP) trained in 4-bit, not plain LoRA.
    linears = {n: m for n, m in loaded[0].named_modules() if n.endswith(("q_proj.base_layer", "mlp.down_proj"))}
    assert len(linears) == 2 * loaded[0].config.num_hidden_layers
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in linears.values()), linears
    adapter = _weights(final)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    assert all(math.isfinite(x) for x in _losses(final.parent))
    adapter_cfg = json.loads((final / "adapter_config.json").read_text())
    assert sorted(adapter_cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_packing_run(sft_config: Any) -> None:
    cfg = sft_config({"data.packing": "true", "peft.enabled": "false", "training_args.learning_rate": "1.0e-3"})
    final = train_finetune.main(cfg)
    assert all(math.isfinite(x) for x in _losses(final.parent))


def test_packed_training_path_keeps_samples_apart(sft_config: Any, tiny_tokenizer: Any) -> None:
    """The model as training loads it (load_model_for_training): per-document attention installed, the KV cache
    off, and a packed batch's logits equal each sample's own. Removing either guard fails here."""
    from self_model.fine_tuning.data import build_sft_dataset, make_collator
    from self_model.fine_tuning.trainer import load_model_for_training, sft_training_args
    from self_model.template.resolve import resolve_template

    cfg = sft_config({"data.packing": "true", "peft.enabled": "false", "training_args.fp16": "false"})
    model = load_model_for_training(cfg, tiny_tokenizer, sft_training_args(cfg)).eval()
    assert model.config._attn_implementation == "sdpa_varlen"  # core/attention.py use_varlen_attention
    assert model.config.use_cache is False  # with the cache on, transformers ignores packed boundaries
    template = resolve_template(cfg, tiny_tokenizer)
    dataset, _ = build_sft_dataset(cfg.data.train_file, tiny_tokenizer, template, cfg.data, 3)
    features = [dataset[i] for i in range(3)]
    packed = make_collator(tiny_tokenizer, packing=True)(features)
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0]
        start = 0
        for f in features:
            n = len(f["input_ids"])
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            torch.testing.assert_close(packed_logits[start:start + n], alone, atol=1e-4, rtol=1e-4)
            start += n


def test_finished_run_is_never_overwritten_and_resume(sft_config: Any, tmp_path: Path) -> None:
    cfg = sft_config({"training_args.max_steps": "2", "training_args.save_steps": "2"})
    final = train_finetune.main(cfg)
    stamp = (final / "adapter_model.safetensors").stat().st_mtime_ns
    with pytest.raises(UserError, match="holds a finished run"):
        train_finetune.main(sft_config({"training_args.max_steps": "2"}))
    assert (final / "adapter_model.safetensors").stat().st_mtime_ns == stamp

    # An unfinished run (checkpoints, no final/) is refused unless resumed; resume continues the step count.
    import shutil

    shutil.rmtree(final)
    with pytest.raises(UserError, match="unfinished run"):
        train_finetune.main(sft_config({"training_args.max_steps": "4"}))
    final = train_finetune.main(sft_config({"training_args.max_steps": "4",
                                            "training_args.resume_from_checkpoint": "auto"}))
    state = json.loads((final.parent / "checkpoint-4" / "trainer_state.json").read_text())
    steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert steps[-2:] == [3, 4] and state["global_step"] == 4


def test_vocab_mismatch_is_refused(sft_config: Any, tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens([f"新词{i}" for i in range(50)])
    tok.save_pretrained(tmp_path / "bigger_tok")
    cfg = sft_config({"tokenizer_name_or_path": str(tmp_path / "bigger_tok")})
    with pytest.raises(UserError, match="do not belong together"):
        train_finetune.main(cfg)
    assert not (Path(cfg.training_args["output_dir"]) / "final").exists()


def test_generation_with_the_saved_chat_template(sft_config: Any) -> None:
    from self_model.core.inference import chat, load_for_inference

    final = train_finetune.main(sft_config({"training_args.max_steps": "2"}))
    model, tokenizer = load_for_inference(final)
    messages = [{"role": "user", "content": "发烧怎么办？"}]
    answer = chat(model, tokenizer, messages, max_new_tokens=8)
    # The same greedy answer by hand from the saved chat template, cut at the end-of-turn token.
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
    assert answer == tokenizer.decode(out, skip_special_tokens=True).strip(), (answer, out)
    eos = model.generation_config.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])


def test_swanlab_local_tracking(sft_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("swanlab")
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    final = train_finetune.main(sft_config({"trace": "swanlab", "training_args.max_steps": "2"}))
    logs = list((final.parent / "swanlog").rglob("*"))
    assert logs, "swanlab local mode wrote nothing"
    text = "".join(p.read_text(errors="ignore") for p in logs if p.is_file() and p.stat().st_size < 1_000_000)
    assert "loss" in text


def test_wandb_offline_tracking(sft_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for key in ("WANDB_MODE", "WANDB_DIR", "WANDB_NAME", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    final = train_finetune.main(sft_config({"trace": "wandb", "training_args.max_steps": "2"}))
    runs = list((final.parent / "wandb").glob("offline-run-*/*.wandb"))
    assert runs and runs[0].stat().st_size > 0


def test_api_key_never_reaches_the_run_folder(sft_config: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("wandb")
    import self_model.core.tracking as tracking

    secret = "wandb-secret-key-1234567890abcdef1234567890abcdef"
    trace_dir = tmp_path / "trace_config"
    trace_dir.mkdir()
    # The key comes from the file here; mode offline keeps the test away from the network.
    (trace_dir / "wandb.yaml").write_text(f"project: test\nmode: offline\napi_key: {secret}\n")
    monkeypatch.setattr(tracking, "TRACE_CONFIG_DIR", trace_dir)
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_NAME"):
        monkeypatch.delenv(key, raising=False)
    final = train_finetune.main(sft_config({"trace": "wandb", "training_args.max_steps": "2"}))
    assert (final.parent / "wandb").is_dir()
    for path in final.parent.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".txt", ".md", ".jsonl", ".log"):
            assert secret not in path.read_text(errors="ignore"), path
    out, err = capfd.readouterr()
    assert secret not in out and secret not in err
