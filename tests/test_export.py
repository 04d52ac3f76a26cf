"""The export (self_model/tools/export_model.py) on the tiny model: LoRA, QLoRA and vocabulary-grown adapters merged
with proof (merged logits = base + adapter logits), INT8 / NF4 (and GPTQ when llm-compressor is installed) exports
that reload with plain transformers and report perplexity, size and load time, and every bad input refused with
its fix and no output left behind."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from conftest import SAMPLE_DIR, run_command

from self_model.core.config import load_config
from self_model.core.errors import ConfigError, UserError
from self_model.tools.export_config import ExportConfig

export_model = pytest.importorskip("self_model.tools.export_model", reason="entry script importable")

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "self_model" / "template" / "qwen2_chatml.json"
SHIPPED = yaml.safe_load((ROOT / "config" / "self_model_config" / "export.yaml").read_text(encoding="utf-8"))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]


def make_adapter_run(base: Path, run: Path, qlora: bool = False, seed: int = 0) -> Path:
    """A LoRA SFT result as train_finetune.py leaves it (final/ with adapter, tokenizer + chat template,
    run_config.yaml naming the data, run_info.json), with random non-zero LoRA weights so that base + adapter
    clearly differs from the base. `qlora`: the adapter is built on the 4-bit (NF4) base, as QLoRA trains it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from self_model.core.run import save_generation_config
    from self_model.template.resolve import resolve_template

    torch.manual_seed(seed)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.float32) if qlora else None
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=quant)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    final = run / "final"
    get_peft_model(model, lora).save_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(base)
    template = resolve_template(SimpleNamespace(template_path=str(TEMPLATE), template=None), tokenizer)
    template.apply_to_tokenizer(tokenizer)
    tokenizer.save_pretrained(final)
    template.save_source(final)
    save_generation_config(model, tokenizer, template, final)
    data = {"train_file": str(SAMPLE_DIR / "sft_train.jsonl"), "eval_file": str(SAMPLE_DIR / "sft_eval.jsonl")}
    config = {"model_name_or_path": str(base), "template_path": str(TEMPLATE), "data": data,
              "peft": {"enabled": True, "qlora": qlora}}
    info = {"stage": "finetune", "start": {"model": str(base), "merged": [], "adapter": None},
            "base_model": str(base), "lineage": []}
    for folder in (run, final):
        (folder / "run_config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        (folder / "run_info.json").write_text(json.dumps(info), encoding="utf-8")
    return final


def export_config(model: Path | str, out: Path, **overrides: Any) -> ExportConfig:
    data = copy.deepcopy(SHIPPED)
    data.update(model_name_or_path=str(model), output_dir=str(out))
    return load_config(ExportConfig, None, [f"{k}={v}" for k, v in overrides.items()], data=data)


@torch.no_grad()
def logits(model: Any, tokenizer: Any, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :64]
    return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter_run(tiny_model_dir, tmp_path_factory.mktemp("lora") / "sft").parent


@pytest.fixture(scope="module")
def lora_export(lora_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model.main(export_config(lora_run, tmp_path_factory.mktemp("exports") / "sft-merged"))


def read(folder: Path, name: str) -> dict[str, Any]:
    return json.loads((folder / name).read_text(encoding="utf-8"))


# ---- merge with proof ---------------------------------------------------------------------------------------
def test_lora_export_is_a_standalone_model_computing_base_plus_adapter(lora_export: Path, lora_run: Path,
                                                                       tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "README.md",
                 "export_report.json", "run_info.json", "chat_template_source.json"):
        assert (lora_export / name).is_file(), name
    assert not (lora_export / "adapter_config.json").exists()
    assert not lora_export.with_name(lora_export.name + ".tmp").exists()
    report = read(lora_export, "export_report.json")
    check = report["check"]
    print(f"LoRA merge: max |logit diff| {check['max_abs_diff']:.3g} (tolerance {check['tolerance']:.3g})")
    assert check["passed"] and check["dtype"] == "float32" and len(check["prompts"]) == 4
    assert check["data_files"] == [str(SAMPLE_DIR / "sft_train.jsonl")] and check["top1_agreement"] == 1.0
    assert check["max_abs_diff"] <= check["tolerance"] <= 1e-3
    # Independently of the export's own check: plain transformers on the export = peft's base + adapter, and both
    # differ clearly from the base alone (so a merge that did nothing could not pass).
    tokenizer = AutoTokenizer.from_pretrained(lora_export)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "发烧了怎么办？"},
                                          {"role": "assistant", "content": "多喝水，注意休息。"}], tokenize=False)
    exported = logits(AutoModelForCausalLM.from_pretrained(lora_export), tokenizer, text)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_logits = logits(base, tokenizer, text)
    adapter = logits(PeftModel.from_pretrained(base, lora_run / "final"), tokenizer, text)
    assert (exported - adapter).abs().max() < 1e-4 < 1e-2 < (adapter - base_logits).abs().max()
    eos = GenerationConfig.from_pretrained(lora_export).eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    assert "<|im_start|>assistant" in tokenizer.chat_template
    card = (lora_export / "README.md").read_text(encoding="utf-8")
    assert f"1. base model: `{tiny_model_dir}`" in card and f"2. finetune (adapter): `{lora_run / 'final'}`" in card
    assert f"3. this export: `{lora_export}`" in card
    info = read(lora_export, "run_info.json")
    assert info["stage"] == "export" and info["start"]["merged"] == [str(lora_run / "final")]
    assert [run["stage"] for run in info["lineage"]] == ["finetune"]


def test_qlora_adapter_is_merged_into_the_full_precision_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    run = make_adapter_run(tiny_model_dir, tmp_path / "qlora", qlora=True).parent
    out = export_model.main(export_config(run, tmp_path / "merged"))
    report = read(out, "export_report.json")
    print(f"QLoRA merge: max |logit diff| {report['check']['max_abs_diff']:.3g}")
    assert report["source"]["trained_on_4bit_base"] and report["check"]["passed"]
    config = read(out, "config.json")
    assert "quantization_config" not in config
    merged, base = load_file(out / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert merged[q].dtype == torch.float32 and merged[q].shape == base[q].shape
    assert (merged[q] - base[q]).abs().max() > 1e-3  # the adapter is in the full-precision weights
    assert "not the 4-bit weights it trained on" in (out / "README.md").read_text(encoding="utf-8")


def test_vocabulary_grown_adapter_merges(pretrain_config: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A CPT LoRA run that grew the vocabulary (new embedding rows trained in full next to the adapter)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from self_model.pretrain import train_pretrain

    words = [f"新药{i}号" for i in range(24)]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(words)
    tok.save_pretrained(tmp_path / "grown_tok")
    corpus = tmp_path / "new_words.txt"
    corpus.write_text("".join(f"{w}用于治疗发热，每日一次。\n" for w in words * 4), encoding="utf-8")
    final = train_pretrain.main(pretrain_config({
        "tokenizer_name_or_path": str(tmp_path / "grown_tok"), "data.train_file": str(corpus),
        "data.eval_file": str(corpus), "data.block_size": "32", "peft.enabled": "true",
        "peft.target_modules": "[q_proj, v_proj]", "training_args.learning_rate": "1.0e-2"}))
    out = export_model.main(export_config(final.parent, tmp_path / "grown"))
    report = read(out, "export_report.json")
    print(f"vocabulary-grown merge: max |logit diff| {report['check']['max_abs_diff']:.3g}")
    assert report["check"]["passed"] and report["check"]["data_files"] == [str(corpus)]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == 3024 == len(AutoTokenizer.from_pretrained(out))
    grown = model.get_input_embeddings().weight[3000:]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight
    assert (grown - base.mean(0)).abs().max() > 1e-3  # the trained new rows, not the mean they started from
    assert read(out, "run_info.json")["lineage"][0]["stage"] == "pretrain"


def test_a_checkpoint_exports_with_the_runs_template(lora_run: Path, tmp_path: Path) -> None:
    """checkpoint-N/ holds no run record and no generation config: both come from its run folder and template."""
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    run = tmp_path / "run"
    shutil.copytree(lora_run / "final", run / "checkpoint-3")
    for name in ("run_info.json", "run_config.yaml", "generation_config.json", "chat_template_source.json"):
        (run / "checkpoint-3" / name).unlink()
    shutil.copy(lora_run / "run_info.json", run / "run_info.json")
    shutil.copy(lora_run / "run_config.yaml", run / "run_config.yaml")
    out = export_model.main(export_config(run / "checkpoint-3", tmp_path / "out"))
    assert read(out, "export_report.json")["check"]["passed"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    assert (out / "chat_template_source.json").is_file()


@pytest.mark.gpu
def test_bfloat16_export_and_nf4_on_a_gpu(lora_run: Path, tmp_path: Path) -> None:
    merged = export_model.main(export_config(lora_run, tmp_path / "bf16", dtype="bfloat16"))
    check = read(merged, "export_report.json")["check"]
    print(f"bfloat16 merge on {torch.cuda.get_device_name()}: max |logit diff| {check['max_abs_diff']:.3g}")
    assert check["passed"] and check["dtype"] == "bfloat16"
    out = export_model.main(export_config(merged, tmp_path / "nf4", **{"quantize.method": "nf4"}))
    q = read(out, "export_report.json")["quantization"]
    assert q["device"] == "cuda" and math.isfinite(q["perplexity_after"])


# ---- quantization -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_bitsandbytes_exports_reload_with_plain_transformers(lora_export: Path, tmp_path: Path, method: str) -> None:
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_model.main(export_config(lora_export, tmp_path / method, **{"quantize.method": method,
                                                                            "quantize.eval_tokens": 512}))
    q = read(out, "export_report.json")["quantization"]
    print(f"{method}: perplexity {q['perplexity_before']:.2f} -> {q['perplexity_after']:.2f}, "
          f"{q['size_bytes_before']} -> {q['size_bytes_after']} bytes, load {q['load_seconds_before']}s -> "
          f"{q['load_seconds_after']}s")
    assert q["method"] == method and q["library"].startswith("bitsandbytes") and q["eval_tokens"] == 512
    assert math.isfinite(q["perplexity_before"]) and math.isfinite(q["perplexity_after"])
    assert abs(math.log(q["perplexity_after"] / q["perplexity_before"])) < 0.2
    assert q["size_bytes_after"] < q["size_bytes_before"] and q["load_seconds_after"] > 0
    assert read(out, "config.json")["quantization_config"]["quant_method"] == "bitsandbytes"
    model = AutoModelForCausalLM.from_pretrained(out)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt if method == "int8" else bnb.nn.Linear4bit)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert torch.isfinite(logits(model, tokenizer, "发烧了怎么办？")).all() and tokenizer.chat_template
    assert "| method | perplexity before |" in (out / "README.md").read_text(encoding="utf-8")
    assert read(out, "export_report.json")["eval_text"]["held_out"]  # the run's eval file


def test_gptq_export_with_llm_compressor(lora_export: Path, tmp_path: Path) -> None:
    pytest.importorskip("llmcompressor", reason="quantize.method: gptq needs llm-compressor (the export extra)")
    from transformers import AutoModelForCausalLM

    out = export_model.main(export_config(lora_export, tmp_path / "gptq", **{
        "quantize.method": "gptq", "quantize.group_size": "32", "quantize.calibration_samples": "16",
        "quantize.eval_tokens": "512"}))
    q = read(out, "export_report.json")["quantization"]
    print(f"gptq: perplexity {q['perplexity_before']:.2f} -> {q['perplexity_after']:.2f}, "
          f"{q['size_bytes_before']} -> {q['size_bytes_after']} bytes")
    config = read(out, "config.json")["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["config_groups"]["group_0"]["weights"][
        "num_bits"] == 4
    assert q["size_bytes_after"] < q["size_bytes_before"] and q["calibration_rows"] == 16
    assert abs(math.log(q["perplexity_after"] / q["perplexity_before"])) < 0.2
    assert torch.isfinite(AutoModelForCausalLM.from_pretrained(out)(torch.tensor([[1, 2, 3]])).logits).all()


def test_gptq_group_size_must_fit_the_model(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from self_model.tools.export_config import QuantizeSection
    from self_model.tools.export_quantize import check_quantizable

    with pytest.raises(UserError, match=r"unsupported for this model: its linear layers take \[64\] inputs.*"
                                        r"group_size: 64"):
        check_quantizable(QuantizeSection(method="gptq", group_size=128),
                          AutoModelForCausalLM.from_pretrained(tiny_model_dir))


# ---- bad input ----------------------------------------------------------------------------------------------
def test_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(UserError, match="is not a run's result: it holds neither config.json"):
        export_model.main(export_config(tmp_path / "notes", tmp_path / "out"))
    unfinished = tmp_path / "run"
    (unfinished / "checkpoint-2").mkdir(parents=True)
    (unfinished / "checkpoint-10").mkdir()
    with pytest.raises(UserError, match=r"run folder without final/.*model_name_or_path=.*checkpoint-10"):
        export_model.main(export_config(unfinished, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_missing_and_mismatched_base(lora_run: Path, tmp_path: Path) -> None:
    import shutil

    from self_model.tools.make_tiny_model import make_tiny_model

    # Missing: an adapter folder whose record names a base that is gone.
    moved = tmp_path / "moved"
    shutil.copytree(lora_run / "final", moved)
    (moved / "run_info.json").unlink()
    adapter = read(moved, "adapter_config.json")
    (moved / "adapter_config.json").write_text(json.dumps({**adapter, "base_model_name_or_path": "/gone/tiny"}))
    with pytest.raises(UserError, match="trained on '/gone/tiny', which is neither a folder here nor a hub id. "
                                        "Point model_name_or_path at that base model"):
        export_model.main(export_config(moved, tmp_path / "out"))
    # Mismatched: the adapter put on another model.
    other = make_tiny_model(tmp_path / "other", hidden=32)
    with pytest.raises(UserError, match=r"a different model \(hidden_size: 64 vs 32"):
        export_model.main(export_config(other, tmp_path / "out", adapter_name_or_path=str(lora_run / "final")))
    assert not (tmp_path / "out").exists()


def test_a_quantized_base_is_refused(lora_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantized = tmp_path / "tiny-bnb-4bit"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True)).save_pretrained(quantized)
    with pytest.raises(UserError, match=r"is quantized \(bitsandbytes\): a LoRA adapter cannot be merged into "
                                        r"quantized weights.*full-precision original"):
        export_model.main(export_config(quantized, tmp_path / "out", adapter_name_or_path=str(lora_run / "final")))


def test_existing_output_is_never_overwritten(lora_run: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists; an export is never overwritten"):
        export_config(lora_run, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_a_tolerance_failure_leaves_nothing(lora_run: Path, tmp_path: Path) -> None:
    cfg = export_config(lora_run, tmp_path / "out", dtype="bfloat16", **{"check.tolerance": "1.0e-9"})
    with pytest.raises(UserError, match=r"does not compute what base \+ adapter computed: max \|logit difference\| "
                                        r".* > tolerance 1e-09 \(check.tolerance\).*Nothing was written"):
        export_model.main(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_unsupported_quantization_method(lora_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        export_config(lora_run, tmp_path / "out", **{"quantize.method": "awq"})
    assert "quantize.method: unsupported quantization method 'awq': AutoAWQ is archived" in str(exc.value)
    assert "choose one of ['none', 'int8', 'nf4', 'gptq']" in str(exc.value)


def test_dry_run_and_exit_code(lora_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from self_model.core.cli import run_main

    assert export_model.main(export_config(lora_run, tmp_path / "out"), dry_run=True) is None
    assert "dry run: nothing is written" in capsys.readouterr().out and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exc:
        run_main(export_model.main, ExportConfig, "", ["--config", str(ROOT / "config/self_model_config/export.yaml"),
                                                       f"model_name_or_path={tmp_path}", f"output_dir={tmp_path}/o"])
    assert exc.value.code != 0
    assert "is not a run's result" in capsys.readouterr().err


def test_readme_export_command(lora_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    result = run_command(["python", "self_model/tools/export_model.py", "--config",
                          "config/self_model_config/export.yaml", f"model_name_or_path={lora_run / 'final'}",
                          f"output_dir={out}"], timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"exported to {out}" in result.stdout and (out / "model.safetensors").is_file()
