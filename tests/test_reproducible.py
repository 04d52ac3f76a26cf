"""Reproducible runs: the same config and seed give the same losses and the same trained weights.

Each run goes through the entry point users run (`main(cfg)`). Before each run the process's random state is set
to something different, as it would be after any other work in a long-lived process: only the stage's own seeding
(`core/run.py: build_training_args`, before any weights are created) can make the two runs agree. LoRA matrices
are drawn when the adapter is attached, before the Trainer seeds itself: without that seeding the losses differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def scramble_rng(seed: int) -> None:
    """A different ambient random state for each run (torch, python, numpy)."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    found = [row["loss"] for row in rows if "loss" in row]
    assert found, f"no training loss logged in {run / 'metrics.jsonl'}"
    return found


def adapter_weights(final: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(final / "adapter_model.safetensors"))


def assert_same_run(first: Path, second: Path) -> None:
    assert losses(first) == losses(second), (losses(first), losses(second))
    a, b = adapter_weights(first / "final"), adapter_weights(second / "final")
    assert a.keys() == b.keys() and a
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"adapter weights differ: {different[:3]}"


def test_sft_lora_is_reproducible(sft_config: Any, tmp_path: Path) -> None:
    import self_model.fine_tuning.train_finetune as entry

    runs = []
    for i, ambient in enumerate((1, 2)):
        cfg = sft_config({"training_args.output_dir": str(tmp_path / f"run{i}"), "training_args.max_steps": 3,
                          "training_args.save_steps": 100, "peft.enabled": True, "peft.lora_dropout": 0.1},
                         data={"eval_file": None})
        scramble_rng(ambient)
        entry.main(cfg)
        runs.append(tmp_path / f"run{i}")
    assert_same_run(*runs)


def test_sft_different_seeds_differ(sft_config: Any, tmp_path: Path) -> None:
    """The test above can fail: another seed gives other LoRA weights and other losses."""
    import self_model.fine_tuning.train_finetune as entry

    for i, seed in enumerate((42, 43)):
        cfg = sft_config({"training_args.output_dir": str(tmp_path / f"run{i}"), "training_args.max_steps": 2,
                          "training_args.save_steps": 100, "training_args.seed": seed, "peft.enabled": True},
                         data={"eval_file": None})
        scramble_rng(7)  # the same ambient state: only the seed differs
        entry.main(cfg)
    assert losses(tmp_path / "run0") != losses(tmp_path / "run1")


def test_cpt_lora_is_reproducible(pretrain_config: Any, tmp_path: Path) -> None:
    import self_model.pretrain.train_pretrain as entry

    runs = []
    for i, ambient in enumerate((1, 2)):
        cfg = pretrain_config({"training_args.output_dir": str(tmp_path / f"run{i}"), "training_args.max_steps": 3,
                               "training_args.save_steps": 100, "training_args.eval_steps": 100,
                               "peft.enabled": True},
                              data={"eval_file": None})
        scramble_rng(ambient)
        entry.main(cfg)
        runs.append(tmp_path / f"run{i}")
    assert_same_run(*runs)
