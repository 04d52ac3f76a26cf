"""The YAML keys every training stage shares: model, tokenizer, template, `peft:`, `trace:`, `training_args:`.

A stage's own sections live in its package (`self_model/<stage>/config.py`) and subclass `StageConfig`. Backend
arguments (`training_args:`) are not re-declared: they are checked against the backend's own class
(`transformers.TrainingArguments`, trl's `DPOConfig`, ...) by `self_model.core.backend_args`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from self_model.core.backend_args import check_training_args
from self_model.core.config import did_you_mean, existing_files
from self_model.core.dataset_mix import DatasetRef, Mix, mix_problems
from self_model.core.lineage import is_adapter, result_folder
from self_model.core.preflight import config_problems, deepspeed_zero, size_problems
from self_model.core.tracking import trace_problems


def check_transformers_args(args: dict[str, Any], path: str) -> list[str]:
    missing = [] if "output_dir" in args else [f"{path}.output_dir: required key is missing (where the run goes)"]
    return missing + check_training_args(args) + size_problems(args)


def at_least_one(value: int, path: str) -> list[str]:
    return [] if value >= 1 else [f"{path}: expected a whole number of at least 1, got {value}"]


def local_or_hub(value: str, path: str) -> list[str]:
    """A local folder, or something shaped like a hub id (org/name); a missing local path is named now."""
    if Path(value).exists() or (value.count("/") == 1 and not value.startswith((".", "/", "~"))):
        return []
    hint = ""
    if "tiny" in value:
        hint = ("; build the embedded tiny model with: "
                f"uv run python self_model/tools/make_tiny_model.py --output {value}")
    return [f"{path}: no such folder: {value} (and not a hub id of the form org/name){hint}"]


def adapter_folder(value: str, path: str) -> list[str]:
    """Field check: a LoRA adapter folder (adapter_config.json; a run folder means its final/), or a hub id."""
    folder = Path(result_folder(value))
    if folder.is_dir():
        if is_adapter(folder):
            return []
        return [f"{path}: {value} holds no adapter_config.json, so it is not a LoRA adapter; full weights (a full "
                "run's final/ or a merged export) go into model_name_or_path instead"]
    if value.count("/") == 1 and not value.startswith((".", "/", "~")):
        return []
    return [f"{path}: no such folder: {value} (a LoRA run's final/ folder, or a hub id of the form org/name)"]


LORA_INITS = ("default", "gaussian", "pissa", "pissa_niter_<N>", "olora", "loftq")


def mutates_base(init: str) -> bool:
    """PiSSA and OLoRA move a rank-r part of each adapted weight into the adapter: the base becomes a residual."""
    return init.startswith("pissa") or init == "olora"


def check_lora_init(value: str, path: str) -> list[str]:
    if value in LORA_INITS or re.fullmatch(r"pissa_niter_\d+", value):
        return []
    return [f"{path}: {value!r} is not a supported initialisation{did_you_mean(value, LORA_INITS)}; expected one of "
            f"{list(LORA_INITS)} (eva / corda need a pass over data first and are not offered)"]


@dataclass
class PeftConfig:
    """`peft:` LoRA / QLoRA. Disabled means full fine-tuning."""

    enabled: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # Module names to adapt, or "all-linear" for every linear layer but the LM head.
    target_modules: list[str] | str = "all-linear"
    # Modules trained in full next to the adapter (e.g. embed_tokens, lm_head after vocabulary growth).
    modules_to_save: list[str] | None = None
    # 4-bit base weights (bitsandbytes); needs enabled: true.
    qlora: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    # DoRA: each update split into a magnitude and a direction (peft's use_dora); slower steps, often better at low r.
    use_dora: bool = False
    # rsLoRA: scale the adapter by lora_alpha / sqrt(lora_r) instead of lora_alpha / lora_r (stable at high ranks).
    use_rslora: bool = False
    # How the adapter starts (peft's init_lora_weights): default (B = 0), gaussian, pissa / pissa_niter_<N> (the
    # principal singular vectors, moved out of the base), olora (QR, likewise), loftq (QLoRA, on a GPU).
    # README "PEFT variants".
    init_lora_weights: str = field(default="default", metadata={"check": check_lora_init})

    def __post_init__(self) -> None:
        if self.qlora and not self.enabled:
            raise ValueError("peft.qlora: true needs peft.enabled: true (QLoRA trains a LoRA adapter on a 4-bit base)")
        if self.lora_r <= 0:
            raise ValueError(f"peft.lora_r must be positive, got {self.lora_r}")
        if problem := peft_variant_problem(self):
            raise ValueError(problem)


def gpu_present() -> bool:
    import torch

    return torch.cuda.is_available() or bool(getattr(torch, "xpu", None) and torch.xpu.is_available())


def peft_variant_problem(peft: PeftConfig) -> str | None:
    """Combinations refused before anything loads, each with the reason (peft 0.21's behaviour)."""
    init = peft.init_lora_weights
    if not peft.enabled and (peft.use_dora or peft.use_rslora or init != "default"):
        return "peft.use_dora / use_rslora / init_lora_weights shape a LoRA adapter: they need peft.enabled: true"
    if mutates_base(init) and peft.qlora:
        return (f"peft.init_lora_weights: {init} with qlora: the SVD / QR runs on full-precision weights (peft "
                "refuses PiSSA on 4-bit ones), and the adapter converted back to the original base would then not "
                "match the re-quantized residual; use init_lora_weights: loftq for a 4-bit base, or qlora: false")
    if mutates_base(init) and peft.use_dora:
        return (f"peft.init_lora_weights: {init} with use_dora: the conversion back to the original base (peft's "
                "path_initial_model_for_weight_conversion) keeps only the A / B matrices, not DoRA's magnitudes")
    if mutates_base(init) and peft.modules_to_save:
        return (f"peft.init_lora_weights: {init} with modules_to_save: peft's conversion back to the original base "
                "keeps only the A / B matrices, so the saved copies of those modules would be lost")
    if init == "loftq" and not peft.qlora:
        return ("peft.init_lora_weights: loftq needs qlora: true. LoftQ starts the adapter from the 4-bit "
                "quantization error of each weight; on a full-precision base there is no error to start from")
    if init == "loftq" and not gpu_present():
        return ("peft.init_lora_weights: loftq needs a CUDA (or XPU) device: peft 0.21's replace_lora_weights_loftq "
                "computes there only; on this machine use init_lora_weights: default")
    if init == "loftq" and peft.use_dora:
        return ("peft.init_lora_weights: loftq with use_dora: LoftQ replaces the A / B matrices after DoRA computed "
                "its magnitudes from them, so the two would disagree")
    return None


def wrapped_init_problem(peft: PeftConfig) -> str | None:
    """Where trl wraps the model (DPO, GRPO, KTO / ORPO / SimPO), the reference is the adapter switched off."""
    init = peft.init_lora_weights
    if peft.enabled and (init == "loftq" or mutates_base(init)):
        return (f"peft.init_lora_weights: {init} is not offered where trl wraps the model (DPO, GRPO, KTO / ORPO / "
                "SimPO): its reference is the adapter switched off, which after PiSSA / OLoRA is the residual base, "
                "not the starting model (and LoftQ's start is computed after wrapping). Use it in SFT and start this "
                "stage from that run's final/.")
    return None


@dataclass
class ChatDataConfig:
    """The `data:` keys SFT and DPO share: files, length limit and its policy, format, sample cap."""

    # Files, or `datasets:` below (one of the two).
    train_file: str | list[str] | None = field(default=None, metadata={"check": existing_files})
    eval_file: str | list[str] | None = field(default=None, metadata={"check": existing_files})
    # Data sets by name (dataset_registry), each {name, weight, max_samples}, mixed by `mix` (README "Datasets by
    # name and mixing"); seeded from training_args.seed.
    datasets: list[DatasetRef] | None = None
    mix: Mix = "concat"
    dataset_registry: str = "config/datasets.yaml"
    mix_seed: int = field(default=42, init=False)  # training_args.seed, set by validate_paths
    # Longest sample in tokens (DPO: prompt + reply, chosen and rejected each); longer ones follow `truncation`.
    max_length: int = 1024
    # auto detects each row's format; or one of the registered formats (see README).
    format: str = "auto"
    # truncate: cut at max_length; drop: leave the sample out. Both are counted and reported.
    truncation: Literal["truncate", "drop"] = "truncate"
    # Use at most this many training rows (quick experiments).
    max_samples: int | None = None

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ValueError(f"data.max_length must be at least 8, got {self.max_length}")
        check_data_source(self, "data")


def check_data_source(data: Any, key: str) -> None:
    """`train_file` or `datasets` (one of them), the named data sets known to the registry, sensible weights."""
    if not data.train_file and not data.datasets and key == "data":
        raise ValueError(f"{key}.train_file or {key}.datasets: one is required (files, or data sets named in "
                         f"{data.dataset_registry})")
    problems = mix_problems(data.train_file, data.datasets, data.mix, data.dataset_registry, key)
    if data.datasets and data.mix == "concat" and getattr(data, "max_samples", None):
        problems.append(f"{key}.max_samples with {key}.mix: concat would keep the first data set's rows only; give "
                        "each data set its own max_samples")
    if problems:
        raise ValueError("\n  ".join(problems))




@dataclass
class StageConfig:
    """Keys every training stage shares."""

    # A base model (folder or hub id), or a previous run's result to start from: its final/ (or the run folder),
    # a checkpoint-N/ or an export, full weights or a LoRA adapter (see start_adapter; README "Chaining stages").
    model_name_or_path: str = field(metadata={"check": local_or_hub})
    # A LoRA adapter to start from, on the base in model_name_or_path. Not needed when model_name_or_path points at
    # the adapter's run itself: its base is then read from the run (run_info.json) or from adapter_config.json.
    adapter_name_or_path: str | None = field(default=None, metadata={"check": adapter_folder})
    # What a starting adapter becomes: continue = train that same adapter further (its own r / alpha / targets;
    # needs peft.enabled); merge = merge it into the base weights in memory, then train what peft: says (a new LoRA
    # or all weights). auto: continue with peft.enabled, merge without.
    start_adapter: Literal["auto", "continue", "merge"] = "auto"
    tokenizer_name_or_path: str | None = field(default=None, metadata={"check": local_or_hub})
    # A template file (self_model/template/*.json or your own) ...
    template_path: str | None = field(default=None, metadata={"check": existing_files})
    # ... or a shipped template by name. Neither: the tokenizer's own chat_template.
    template: str | None = None
    peft: PeftConfig = field(default_factory=PeftConfig)
    # Checked when the config loads (installed, its config/trace_config/ file valid, a key for online modes).
    trace: Literal["none", "wandb", "swanlab"] = field(default="none", metadata={"check": trace_problems})
    # Run code shipped with a hub model (ChatGLM3, Baichuan2). Off unless you trust the repository.
    trust_remote_code: bool = False
    # Passed to the backend's arguments class and checked against its fields.
    training_args: dict[str, Any] = field(default_factory=dict, metadata={"check": check_transformers_args})
    # Stop training after this many logged steps in a row with a non-finite loss or gradient norm (core/run.py
    # RunGuard): no checkpoint is saved from then on and no final/ is written. 1 stops at the first one.
    divergence_patience: int = field(default=1, metadata={"check": at_least_one})

    @property
    def tokenizer_path(self) -> str:
        """tokenizer_name_or_path, else the starting adapter's folder when it holds a tokenizer (its vocabulary and
        chat template are what it was trained with), else the model's (a run folder: its final/)."""
        if self.tokenizer_name_or_path:
            return self.tokenizer_name_or_path
        if self.adapter_name_or_path:
            adapter = result_folder(self.adapter_name_or_path)
            if (Path(adapter) / "tokenizer_config.json").is_file():
                return adapter
        return result_folder(self.model_name_or_path)

    def validate_paths(self) -> list[str]:
        errors = []
        if self.template_path and self.template:
            errors.append("template / template_path: set one of them, not both")
        starts_from_adapter = bool(self.adapter_name_or_path) or is_adapter(result_folder(self.model_name_or_path))
        if starts_from_adapter and self.start_adapter == "continue" and not self.peft.enabled:
            errors.append("start_adapter: continue keeps training the starting LoRA adapter, which needs "
                          "peft.enabled: true; or set start_adapter: merge to merge it and train all weights")
        if starts_from_adapter and self.peft.qlora and self.start_adapter == "merge":
            errors.append("start_adapter: merge with peft.qlora: an adapter cannot be merged into 4-bit weights; "
                          "export the merged model first (self_model/tools/export_model.py) and start from it, or "
                          "set start_adapter: continue")
        zero = deepspeed_zero(self.training_args)
        if mutates_base(self.peft.init_lora_weights) and ((zero and zero[2].get("stage") == 3)
                                                           or self.training_args.get("fsdp")):
            errors.append(f"peft.init_lora_weights: {self.peft.init_lora_weights} decomposes whole weights, which "
                          "ZeRO-3 / FSDP shard; use ZeRO-2 or plain DDP, or init_lora_weights: default")
        for section in (getattr(self, "data", None), getattr(self, "ppo", None)):
            if hasattr(section, "mix_seed"):  # the data mix follows the run's seed (GRPO: ppo.trl_args.seed)
                section.mix_seed = int(getattr(section, "trl_args", self.training_args).get("seed", 42))
        return errors + config_problems(self)  # core/preflight.py: known-bad combinations, before weights load


