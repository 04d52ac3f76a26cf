"""Chaining stages: every stage starts from a previous run's folder (full weights or a LoRA adapter), and run_info.json
records the chain. The seed's order on the tiny model: CPT (LoRA, vocabulary growth) -> SFT (LoRA on the merged CPT
model) -> DPO (continuing the SFT adapter) -> GRPO (continuing the DPO adapter) -> export, checked against the same
chain built by hand with peft. Plus the start rules themselves, on folders made without training."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import SAMPLE_DIR
from rl_helpers import SHIPPED, TEMPLATE

from self_model.core.config import load_config
from self_model.core.errors import ConfigError, UserError
from self_model.core.lineage import lineage_record, resolve_start

train_pretrain = pytest.importorskip("self_model.pretrain.train_pretrain", reason="entry script importable")
NEW_WORDS = [f"新药{i}号" for i in range(24)]
GRPO_SMALL = {"ppo.rollout_n": "2", "ppo.train_batch_size": "4", "ppo.ppo_mini_batch_size": "4",
              "ppo.ppo_micro_batch_size_per_gpu": "4", "ppo.total_training_steps": "1", "ppo.max_response_length": "8",
              "ppo.eval_file": "null", "ppo.actor_lr": "5.0e-3"}


def info(final: Path) -> dict[str, Any]:
    return json.loads((final / "run_info.json").read_text(encoding="utf-8"))


def rlhf_config(cls: type, model: Path, overrides: dict[str, Any]) -> Any:
    """rlhf.yaml starting from a previous run's folder: no base, no adapter key, no tokenizer key."""
    data = copy.deepcopy(SHIPPED)
    data.update(model_name_or_path=str(model), adapter_name_or_path=None, tokenizer_name_or_path=None,
                template_path=str(TEMPLATE))
    data["data"].update(train_file=str(SAMPLE_DIR / "dpo_train.jsonl"), eval_file=None)
    data["ppo"].update(train_file=str(SAMPLE_DIR / "grpo_train.jsonl"))
    data["ppo"]["trl_args"].update(disable_tqdm=True)
    return load_config(cls, None, [f"{k}={v}" for k, v in overrides.items()], data=data)


@pytest.fixture(scope="module")
def cpt_run(tiny_model_dir: Path, pretrain_yaml: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CPT with LoRA on a tokenizer with 24 new words: the grown embeddings train in full next to the adapter."""
    from transformers import AutoTokenizer

    from self_model.pretrain.config import PretrainConfig

    work = tmp_path_factory.mktemp("chain")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(NEW_WORDS)
    tok.save_pretrained(work / "grown_tok")
    corpus = work / "corpus.txt"
    corpus.write_text("".join(f"{w}用于治疗发热，每日一次。\n" for w in NEW_WORDS * 4) +
                      (SAMPLE_DIR / "pretrain.txt").read_text(encoding="utf-8"), encoding="utf-8")
    data = copy.deepcopy(pretrain_yaml)
    data.update(model_name_or_path=str(tiny_model_dir), tokenizer_name_or_path=str(work / "grown_tok"))
    data["data"].update(train_file=str(corpus), eval_file=None, block_size=32, cache_dir=str(work / "cache"))
    data["peft"].update(enabled=True, target_modules=["q_proj", "v_proj"])
    data["training_args"].update(output_dir=str(work / "cpt"), max_steps=4, learning_rate=1.0e-2, logging_steps=1,
                                 save_steps=4, per_device_train_batch_size=4, disable_tqdm=True)
    return train_pretrain.main(load_config(PretrainConfig, None, data=data)).parent


def test_the_seed_chain_cpt_sft_dpo_grpo_then_export(cpt_run: Path, sft_config: Any, tiny_model_dir: Path,
                                                     tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from self_model.fine_tuning import train_finetune
    from self_model.rlhf import train_dpo, train_grpo
    from self_model.rlhf.config import DPOStageConfig, GRPOStageConfig
    from self_model.tools import export_model
    from self_model.tools.export_config import ExportConfig

    cpt = cpt_run / "final"
    # SFT from the CPT run folder (the run folder, not final/: that is found), its adapter merged, a new LoRA on top.
    sft = train_finetune.main(sft_config({"model_name_or_path": str(cpt_run), "tokenizer_name_or_path": "null",
                                          "start_adapter": "merge", "data.eval_file": "null",
                                          "training_args.output_dir": str(tmp_path / "sft")}))
    # DPO and GRPO each from the previous final/, continuing its adapter (the default with peft.enabled).
    dpo = train_dpo.main(rlhf_config(DPOStageConfig, sft, {
        "training_args.output_dir": str(tmp_path / "dpo"), "training_args.max_steps": "2",
        "training_args.per_device_train_batch_size": "4", "training_args.disable_tqdm": "true"}))
    grpo = train_grpo.main(rlhf_config(GRPOStageConfig, dpo, {**GRPO_SMALL, "ppo.output_dir": str(tmp_path / "grpo")}))

    # The chain each run recorded: how to rebuild its starting weights, and the runs behind it.
    assert info(cpt)["stage"] == "pretrain" and info(cpt)["lineage"] == []
    assert info(cpt)["start"] == {"model": str(tiny_model_dir), "merged": [], "adapter": None}
    assert info(sft)["start"] == {"model": str(tiny_model_dir), "merged": [str(cpt)], "adapter": None}
    assert info(dpo)["start"] == {"model": str(tiny_model_dir), "merged": [str(cpt)], "adapter": str(sft)}
    assert info(grpo)["start"] == {"model": str(tiny_model_dir), "merged": [str(cpt)], "adapter": str(dpo)}
    assert [(r["stage"], r["path"]) for r in info(grpo)["lineage"]] == [("pretrain", str(cpt)), ("finetune", str(sft)),
                                                                         ("dpo", str(dpo))]
    assert info(grpo)["stage"] == "grpo" and info(grpo)["base_model"] == str(tiny_model_dir)
    # SFT trained on the grown vocabulary (CPT's rows merged); DPO's reference was the SFT model (stacked adapter).
    assert len(AutoTokenizer.from_pretrained(sft)) == 3024
    assert json.loads((dpo / "data_report.json").read_text())["reference"].startswith("stacked:")
    grpo_log = [e for e in json.loads((max(grpo.parent.glob("checkpoint-*")) / "trainer_state.json").read_text())[
        "log_history"] if "kl" in e]
    assert grpo_log and abs(grpo_log[0]["kl"]) < 1e-3  # the reference is the policy's start: the DPO model

    # Export the end of the chain, and check it against the chain built by hand with peft.
    out = export_model.main(load_config(ExportConfig, str(Path(__file__).parents[1] / "config" / "self_model_config" /
                                                          "export.yaml"),
                                        [f"model_name_or_path={grpo}", f"output_dir={tmp_path / 'export'}"]))
    report = json.loads((out / "export_report.json").read_text())
    assert report["check"]["passed"] and report["source"]["adapters_merged"] == [str(cpt), str(grpo)]
    card = (out / "README.md").read_text(encoding="utf-8")
    for line in (f"2. pretrain (adapter): `{cpt}`", f"3. finetune (adapter): `{sft}`", f"4. dpo (adapter): `{dpo}`",
                 f"5. grpo (adapter): `{grpo}`", f"6. this export: `{out}`"):
        assert line in card, card
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(f"{NEW_WORDS[0]}用于治疗发热。", return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.resize_token_embeddings(3024)
    by_hand = PeftModel.from_pretrained(PeftModel.from_pretrained(base, cpt).merge_and_unload(), grpo)
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(out)(ids).logits
        expected = by_hand(ids).logits
        raw = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        raw.resize_token_embeddings(3024)  # peft saved the grown embeddings with the adapter; CPT's LoRA it did not
        naive = PeftModel.from_pretrained(raw, grpo)(ids).logits  # what adapter_config.json alone says
    assert (exported - expected).abs().max() < 1e-4
    assert (exported - naive).abs().max() > 1e-3  # the CPT merge is not optional


def test_sft_continues_a_cpt_adapter_by_default(cpt_run: Path, sft_config: Any, tiny_model_dir: Path,
                                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's failing case: finetune.yaml pointed at a CPT LoRA run (it used to fail with "not linear layers")."""
    from safetensors.torch import load_file

    from self_model.fine_tuning import train_finetune

    cfg = sft_config({"model_name_or_path": str(cpt_run / "final"), "tokenizer_name_or_path": "null",
                      "data.eval_file": "null", "training_args.max_steps": "2",
                      "training_args.output_dir": str(tmp_path / "sft")})
    assert train_finetune.main(cfg, dry_run=True) is None
    assert f"model:      {tiny_model_dir} + adapter {cpt_run / 'final'} (trained further)" in capsys.readouterr().out
    final = train_finetune.main(cfg)
    before, after = load_file(cpt_run / "final" / "adapter_model.safetensors"), load_file(
        final / "adapter_model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert info(final)["start"]["adapter"] == str(cpt_run / "final")
    assert info(final)["lineage"][0]["stage"] == "pretrain"


# ---- the start rules, on folders made without training -------------------------------------------------------
def fake_adapter(folder: Path, base: str, start: dict[str, Any] | None = None, stage: str = "finetune") -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    if start is not None:
        (folder / "run_info.json").write_text(json.dumps({"stage": stage, "start": start, "base_model": base,
                                                          "lineage": []}))
    return folder


def test_start_rules(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = str(tiny_model_dir)
    a1 = fake_adapter(tmp_path / "cpt" / "final", base, {"model": base, "merged": [], "adapter": None}, "pretrain")
    a2 = fake_adapter(tmp_path / "sft" / "final", base, {"model": base, "merged": [str(a1)], "adapter": None})
    # A run folder means its final/; an adapter's base (and what was merged under it) comes from its run.
    start = resolve_start(str(tmp_path / "sft"), peft_enabled=True)
    assert (start.model, start.merged, start.adapter) == (base, [str(a1)], str(a2))
    start = resolve_start(str(a2), peft_enabled=False)  # no LoRA: merged, all weights train
    assert (start.merged, start.adapter) == ([str(a1), str(a2)], None)
    assert [r["stage"] for r in start.lineage] == ["finetune"] and start.base_model == base
    # A checkpoint reads its run folder's record.
    ckpt = fake_adapter(tmp_path / "sft2" / "checkpoint-4", base)
    (tmp_path / "sft2" / "run_info.json").write_text(json.dumps({"stage": "finetune", "start": {
        "model": base, "merged": [str(a1)], "adapter": None}}))
    assert resolve_start(str(ckpt), peft_enabled=True).merged == [str(a1)]
    # Full weights: loaded as they are.
    assert resolve_start(base).record() == {"start": {"model": base, "merged": [], "adapter": None},
                                            "base_model": base, "lineage": []}
    with pytest.raises(UserError, match="is itself a LoRA adapter, and adapter_name_or_path names another one"):
        resolve_start(str(a2), str(a1))
    with pytest.raises(UserError, match="start_adapter: continue keeps training the starting LoRA adapter, which "
                                        "needs peft.enabled: true"):
        resolve_start(str(a2), mode="continue", peft_enabled=False)
    gone = fake_adapter(tmp_path / "gone" / "final", base, {"model": base, "merged": ["/nowhere"], "adapter": None})
    with pytest.raises(UserError, match="that adapter is gone; restore that run folder, or start from a merged"):
        resolve_start(str(gone), peft_enabled=True)


def test_start_keys_in_the_stage_configs(sft_config: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    from self_model.rlhf.config import GRPOStageConfig
    from self_model.rlhf.ppo_grpo.verl_bridge import verl_overrides

    adapter = fake_adapter(tmp_path / "sft" / "final", str(tiny_model_dir))
    with pytest.raises(ConfigError, match="start_adapter: continue keeps training .* needs peft.enabled: true"):
        sft_config({"model_name_or_path": str(adapter), "start_adapter": "continue", "peft.enabled": "false"})
    with pytest.raises(ConfigError, match="start_adapter: merge with peft.qlora: an adapter cannot be merged into "
                                          "4-bit weights"):
        sft_config({"model_name_or_path": str(adapter), "start_adapter": "merge", "peft.qlora": "true"})
    cfg = sft_config({"model_name_or_path": str(tmp_path / "sft")})
    assert lineage_record(cfg)["start"] == {"model": str(tiny_model_dir), "merged": [], "adapter": str(adapter)}
    assert lineage_record(cfg)["stage"] == "finetune"
    # verl takes full weights plus one adapter to continue; a start that needs a merge is refused with the fix.
    rl = rlhf_config(GRPOStageConfig, adapter, {"ppo.backend": "verl", "ppo.prepare_only": "true"})
    overrides = verl_overrides(rl, tmp_path / "run", "/tok", False)
    assert f"actor_rollout_ref.model.path={tiny_model_dir}" in overrides
    assert f"actor_rollout_ref.model.lora_adapter_path={adapter}" in overrides
    merged = rlhf_config(GRPOStageConfig, adapter, {"ppo.backend": "verl", "start_adapter": "merge"})
    with pytest.raises(UserError, match="verl loads full weights .* self_model/tools/export_model.py"):
        verl_overrides(merged, tmp_path / "run", "/tok", False)


def test_shipped_yamls_document_the_start_keys() -> None:
    root = Path(__file__).resolve().parents[1] / "config" / "self_model_config"
    for name in ("finetune.yaml", "pretrain.yaml", "rlhf.yaml"):
        text = (root / name).read_text(encoding="utf-8")
        assert "start_adapter:" in text, name
        assert yaml.safe_load(text).get("start_adapter", "auto") == "auto"
