"""The one run lifecycle (core/run.py `train_and_save`) that every training stage goes through: run info, training,
the divergence check, the stage's results, final/, and the tracker closed, also when training fails."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import self_model.core.tracking as tracking
from self_model.core import run
from self_model.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TRAINING_SCRIPTS = ["self_model/fine_tuning/train_finetune.py", "self_model/pretrain/train_pretrain.py",
                    "self_model/rlhf/train_dpo.py", "self_model/rlhf/train_grpo.py",
                    "self_model/rlhf/train_reward.py", "self_model/rlhf/train_preference.py"]


@dataclass
class Cfg:
    trace: str


class FakeTrainer:
    """Just what train_and_save touches: args, train() calling the callbacks at each step as the Trainer does,
    state.log_history."""

    def __init__(self, output_dir: Path, losses: list[float], fail: bool = False):
        self.args = SimpleNamespace(output_dir=str(output_dir), fp16=False, world_size=1,
                                    per_device_train_batch_size=2, gradient_accumulation_steps=4)
        self.train_dataset = None  # the effective-batch line then says tokens were not measured
        self.state = SimpleNamespace(log_history=[], global_step=0)
        self.losses, self.fail, self.resumed_from = losses, fail, "not called"
        self.callbacks: list[Any] = []

    def add_callback(self, callback: Any) -> None:
        self.callbacks.append(callback)

    def train(self, resume_from_checkpoint: str | None = None) -> None:
        self.resumed_from = resume_from_checkpoint
        if self.fail:
            raise RuntimeError("out of memory")
        for step, loss in enumerate(self.losses, 1):
            control = SimpleNamespace(should_save=True, should_evaluate=False, should_training_stop=False)
            self.state.global_step = step
            self.state.log_history.append({"loss": loss, "step": step})
            for callback in self.callbacks:
                callback.on_log(self.args, self.state, control, logs={"loss": loss})
                callback.on_step_end(self.args, self.state, control)
            if control.should_training_stop:
                return


@pytest.fixture
def lifecycle(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the tracker closing and the final/ save instead of doing them."""
    events: list[str] = []
    monkeypatch.setattr(tracking, "finish_tracking", lambda trace: events.append(f"closed {trace}"))

    def fake_save(trainer: Any, tokenizer: Any, template: Any, cfg: Any, files: dict[str, Any]) -> Path:
        events.append(f"saved {sorted(files)}")
        return Path(trainer.args.output_dir) / run.FINAL_DIR

    monkeypatch.setattr(run, "save_final", fake_save)
    return events


def test_a_run_writes_info_trains_saves_the_stage_results_and_closes_tracking(tmp_path: Path, lifecycle: list[str]):
    trainer = FakeTrainer(tmp_path, [2.0, 1.5])
    cfg = Cfg(trace="wandb")
    final, results = run.train_and_save(trainer, cfg, "checkpoint-4", None, None, {"train_data": {"rows": 3}},
                                        finish=lambda t: {"data_report.json": {"steps": len(t.state.log_history)}})
    assert final == tmp_path / "final" and results == {"data_report.json": {"steps": 2}}
    assert trainer.resumed_from == "checkpoint-4"
    assert json.loads((tmp_path / "run_info.json").read_text())["train_data"] == {"rows": 3}
    assert lifecycle == ["saved ['data_report.json']", "closed wandb"]
    assert [type(c).__name__ for c in trainer.callbacks] == ["RunRecordCallback", "RunGuard"]  # record; signals, NaN


@pytest.mark.parametrize("fail", ["diverged", "crashed"])
def test_a_failed_run_writes_no_final_and_still_closes_tracking(tmp_path: Path, lifecycle: list[str],
                                                                fail: str) -> None:
    trainer = FakeTrainer(tmp_path, [2.0, float("nan"), 1.0], fail=fail == "crashed")
    with pytest.raises(UserError if fail == "diverged" else RuntimeError) as exc:
        run.train_and_save(trainer, Cfg(trace="swanlab"), None, None, None, {},
                           finish=lambda t: pytest.fail("finish must not run after a failed training"),
                           hint="Lower ppo.actor_lr.")
    if fail == "diverged":
        assert "training diverged at step 2 (loss nan" in str(exc.value)
        assert "no final/ was written" in str(exc.value) and "Lower ppo.actor_lr." in str(exc.value)
        assert trainer.state.global_step == 2  # stopped at the bad step, not after the whole run
    assert lifecycle == ["closed swanlab"]  # no save, but the tracker's run is closed


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_every_training_stage_goes_through_the_one_lifecycle(script: str) -> None:
    """Each entry script prepares its folder with prepare_output_dir and trains only through train_and_save (a
    direct trainer.train() call would skip the divergence check or the tracker's close, as GRPO once did)."""
    tree = ast.parse((ROOT / script).read_text(encoding="utf-8"))
    calls = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
             for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert {"prepare_output_dir", "train_and_save"} <= calls, f"{script} bypasses the run lifecycle"
    assert not {"train", "save_final", "finish_tracking", "write_run_info"} & calls, \
        f"{script} repeats a lifecycle step itself"
