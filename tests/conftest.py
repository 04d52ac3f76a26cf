"""Shared fixtures: a tiny model built offline, the shipped sample data, the real data in ../shared.

Nothing here touches a model hub: HF_HUB_OFFLINE is forced on for the whole session.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = ROOT / "data_process" / "sample_data"
SHARED_DIR = ROOT.parent / "shared"
SHARED_DATA = SHARED_DIR / "data" / "medicalgpt"
CHAT_TEMPLATES = SHARED_DIR / "reference" / "chat_templates"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_net = pytest.mark.skip(reason="needs network access (set SELF_MODEL_NETWORK_TESTS=1 to run)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "network" in item.keywords and os.environ.get("SELF_MODEL_NETWORK_TESTS") != "1":
            item.add_marker(skip_net)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default model: tiny Qwen2 + a BPE tokenizer trained on the sample corpus."""
    from self_model.tools.make_tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny_qwen2")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def skip_unless_ci(reason: str) -> None:
    """A missing ../shared skips locally; under CI (`CI` set) the tests that need it must run, so it fails."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so these tests must run: check out ../shared beside the repository")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        skip_unless_ci(f"{SHARED_DATA} is absent (it ships with the development checkout only)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def finetune_yaml() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "config" / "self_model_config" / "finetune.yaml").read_text(encoding="utf-8"))


@pytest.fixture
def sft_config(tiny_model_dir: Path, finetune_yaml: dict[str, Any], tmp_path: Path):
    """Build a FinetuneConfig from the shipped YAML pointed at the tiny model and a temp output dir."""
    from self_model.core.config import load_config
    from self_model.fine_tuning.config import FinetuneConfig

    def make(overrides: dict[str, Any] | None = None, **sections: Any) -> FinetuneConfig:
        data = copy.deepcopy(finetune_yaml)
        data["model_name_or_path"] = str(tiny_model_dir)
        data["tokenizer_name_or_path"] = str(tiny_model_dir)
        data["template_path"] = str(ROOT / "self_model" / "template" / "qwen2_chatml.json")
        data["data"]["train_file"] = str(SAMPLE_DIR / "sft_train.jsonl")
        data["data"]["eval_file"] = str(SAMPLE_DIR / "sft_eval.jsonl")
        data["training_args"].update(output_dir=str(tmp_path / "run"), max_steps=4, logging_steps=1,
                                     save_steps=2, eval_steps=2, per_device_train_batch_size=4,
                                     gradient_accumulation_steps=1, disable_tqdm=True)
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key].update(value)
            else:
                data[key] = value
        return load_config(FinetuneConfig, None, [f"{k}={v}" for k, v in (overrides or {}).items()], data=data)

    return make


@pytest.fixture
def clean_dir(tmp_path: Path) -> Path:
    out = tmp_path / "work"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    return out


@pytest.fixture(scope="session")
def pretrain_yaml() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "config" / "self_model_config" / "pretrain.yaml").read_text(encoding="utf-8"))


@pytest.fixture
def pretrain_config(tiny_model_dir: Path, pretrain_yaml: dict[str, Any], tmp_path: Path):
    """Build a PretrainConfig from the shipped YAML pointed at the tiny model, a temp output dir and a temp cache."""
    from self_model.core.config import load_config
    from self_model.pretrain.config import PretrainConfig

    def make(overrides: dict[str, Any] | None = None, **sections: Any) -> PretrainConfig:
        data = copy.deepcopy(pretrain_yaml)
        data["model_name_or_path"] = str(tiny_model_dir)
        data["tokenizer_name_or_path"] = str(tiny_model_dir)
        data["data"].update(train_file=str(SAMPLE_DIR / "pretrain.txt"),
                            eval_file=str(SAMPLE_DIR / "pretrain_eval.txt"), cache_dir=str(tmp_path / "cache"))
        data["training_args"].update(output_dir=str(tmp_path / "run"), max_steps=4, logging_steps=1, save_steps=2,
                                     eval_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                                     disable_tqdm=True)
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key].update(value)
            else:
                data[key] = value
        return load_config(PretrainConfig, None, [f"{k}={v}" for k, v in (overrides or {}).items()], data=data)

    return make


# ---- the commands a user types, as subprocesses -----------------------------------------------------------
EMBEDDED_MODEL = "self_model/checkpoints/tiny_qwen2"


def run_command(args: list[str], timeout: int = 900, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a command from the repository root, offline, the way a user would (args[0] 'python' = this one)."""
    import subprocess

    if args and args[0] == "python":
        args = [sys.executable, *args[1:]]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **env})


def free_port() -> str:
    """A free TCP port for torchrun's rendezvous: fixed ports collide when two test runs share a machine."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.fixture(scope="session")
def embedded_model() -> str:
    """The README builds the tiny model at this fixed path (the shipped YAMLs point there)."""
    result = run_command(["python", "self_model/tools/make_tiny_model.py", "--output", EMBEDDED_MODEL])
    assert result.returncode == 0, result.stderr
    return EMBEDDED_MODEL
