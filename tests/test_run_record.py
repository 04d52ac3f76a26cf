"""Run folders worth opening (issue 15): metrics.jsonl with every logged step, curves.png, and a model card in final/;
a resumed run's metrics hold each step once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from self_model.core.run_record import draw_curves, model_card
from self_model.fine_tuning import train_finetune


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def test_run_folder_has_metrics_curves_and_a_model_card(sft_config: Any, tmp_path: Path) -> None:
    final = train_finetune.main(sft_config())
    run = final.parent
    logged = metrics(run)
    train_steps = [e["step"] for e in logged if "loss" in e]
    assert train_steps == [1, 2, 3, 4]  # logging_steps 1, max_steps 4: every step, once
    assert [e["step"] for e in logged if "eval_loss" in e] == [2, 4]
    checkpointed = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert logged[:-1] == checkpointed and "train_runtime" in logged[-1]  # plus the end-of-training summary
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (final / "README.md").read_text(encoding="utf-8")
    for needed in ("A LoRA adapter on", "## Data", "sft_train.jsonl", "rows_in 80", "## Key settings", "method: LoRA",
                   "## Final metrics", "eval_loss:", "## Lineage", "## Load it", "AutoPeftModelForCausalLM"):
        assert needed in card, needed
    last_eval = [e for e in logged if "eval_loss" in e][-1]["eval_loss"]
    assert f"eval_loss: {last_eval:.4g}" in card


def test_resumed_run_lists_each_step_once(sft_config: Any, tmp_path: Path) -> None:
    """Killed after checkpoint-2 with steps 3-4 already logged: the resume repeats them, the file does not."""
    train_finetune.main(sft_config())
    run = tmp_path / "run"
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoint-4")
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"loss": 9.9, "step": 3}) + "\n")  # what the killed process had written
    train_finetune.main(sft_config({"training_args.resume_from_checkpoint": "auto"}))
    assert [e["step"] for e in metrics(run) if "loss" in e] == [1, 2, 3, 4]


def test_curves_and_card_for_a_full_model_without_eval(tmp_path: Path) -> None:
    history = [{"loss": 2.0, "learning_rate": 1e-3, "step": 1}, {"loss": 1.0, "learning_rate": 5e-4, "step": 2}]
    assert draw_curves(tmp_path, history) == tmp_path / "curves.png"
    assert draw_curves(tmp_path / "none", [{"train_runtime": 1.0, "step": 2}]) is None  # nothing to draw

    class Cfg:
        model_name_or_path = "org/base"
        training_args = {"output_dir": str(tmp_path / "cpt"), "learning_rate": 1e-4}
        peft = None

    card = model_card(Cfg(), tmp_path, tmp_path / "final", history, {},
                      {"lineage": [{"stage": "pretrain", "path": "runs/cpt/final"}]})
    assert "Full weights fine-tuned from `org/base`" in card and "- loss: 1" in card
    assert "- pretrain: `runs/cpt/final`" in card and "AutoModelForCausalLM" in card
