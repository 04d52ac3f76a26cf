"""Where a run starts, and the chain of runs behind it.

Every stage's `model_name_or_path` takes a base model (a folder or a hub id) or a previous run's result: its
`final/`, a `checkpoint-N/`, an export, or the run folder itself (meaning its `final/`). A result holds either
- full weights (`config.json`): loaded as they are, or
- a LoRA adapter (`adapter_config.json`): its base is read from the run's record (`run_info.json`, key `start`),
  else from the adapter's own `base_model_name_or_path`. `start_adapter` decides what the adapter becomes:
  `continue` trains that same adapter further, `merge` merges it into the base weights in memory and trains what
  `peft:` says (a new LoRA, or all weights); `auto` continues with `peft.enabled`, merges without.
`adapter_name_or_path` names the adapter next to an explicit base in `model_name_or_path` (the older form).

`run_info.json` of every run records the chain:
    stage       pretrain / finetune / dpo / grpo / ppo / export (from the config class)
    start       the weights this run started from: {"model": full weights, "merged": [adapters merged into them,
                in order], "adapter": the adapter it continued, or null}; an adapter this run saves sits on
                model + merged, which is how a later run (or the export) rebuilds its base
    base_model  the first model of the chain
    lineage     the previous runs, oldest first: {"path", "stage", "base", "kind": "adapter" | "full"}
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from self_model.core.errors import UserError

logger = logging.getLogger("self_model")

ADAPTER_CONFIG = "adapter_config.json"
RUN_INFO = "run_info.json"
FINAL = "final"
# Keys of config.json that must agree between the model an adapter was trained on and the one it is loaded onto.
SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def looks_like_hub_id(value: str) -> bool:
    return value.count("/") == 1 and not value.startswith((".", "/", "~")) and not Path(value).exists()


def result_folder(path: str) -> str:
    """A run folder given for its result means its final/; anything else is returned unchanged."""
    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file() and not is_adapter(folder) \
            and (folder / FINAL).is_dir():
        return str(folder / FINAL)
    return path


def absolute(path: str) -> str:
    """A local path made absolute (the record stays valid from any working directory); hub ids unchanged."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def read_run_info(folder: str | Path) -> dict[str, Any] | None:
    """The run record of a result folder: its own copy (final/, exports), else its run folder's (checkpoint-N/)."""
    folder = Path(folder)
    candidates = [folder / RUN_INFO]
    if re.fullmatch(r"checkpoint-\d+", folder.name):
        candidates.append(folder.parent / RUN_INFO)
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: not valid JSON ({exc}); restore it from the run folder") from None
    return None


def adapter_base(adapter: str) -> tuple[str, list[str]]:
    """The weights `adapter` was trained on: (full weights, adapters merged into them first, in order)."""
    start = (read_run_info(adapter) or {}).get("start") or {}
    if start.get("model"):
        return start["model"], list(start.get("merged") or [])
    try:
        config = json.loads((Path(adapter) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{adapter}/{ADAPTER_CONFIG}: cannot read it ({exc})") from None
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter}/{ADAPTER_CONFIG} names no base_model_name_or_path: set model_name_or_path to the "
                        f"base model it was trained on and adapter_name_or_path to {adapter}")
    return base, []


def model_config(path: str) -> dict[str, Any] | None:
    config = Path(path) / "config.json"
    return json.loads(config.read_text(encoding="utf-8")) if config.is_file() else None


def check_same_base(adapter: str, trained_on: str, given: str) -> None:
    """Refuse an adapter on a base whose shape differs from the one it was trained on (both local folders)."""
    if absolute(trained_on) == absolute(given):
        return
    theirs, ours = model_config(trained_on), model_config(given)
    if theirs is None or ours is None:
        logger.info("the adapter %s was trained on %s; loading it onto %s", adapter, trained_on, given)
        return
    differ = [k for k in SHAPE_KEYS if theirs.get(k) != ours.get(k)]
    if differ:
        raise UserError(f"the adapter {adapter} was trained on {trained_on}, but model_name_or_path is {given}, a "
                        f"different model ({', '.join(f'{k}: {theirs.get(k)} vs {ours.get(k)}' for k in differ)}). "
                        f"Set model_name_or_path to {trained_on} (or leave the base out and point model_name_or_path "
                        f"at {adapter}: its base is found by itself).")
    logger.warning("the adapter %s was trained on %s and is loaded onto %s (same shape; make sure it holds the same "
                   "weights)", adapter, trained_on, given)


@dataclass
class Start:
    """The weights a run starts from, and the runs behind them."""

    model: str  # full weights to load (a folder or a hub id)
    merged: list[str] = field(default_factory=list)  # adapters merged into `model` in memory, in order
    adapter: str | None = None  # the adapter that training continues (with start_adapter: continue)
    given_adapter: str | None = None  # the starting adapter, continued or merged
    base_model: str = ""  # the first model of the chain
    lineage: list[dict[str, Any]] = field(default_factory=list)  # previous runs, oldest first

    def record(self) -> dict[str, Any]:
        """The run_info.json keys (see the module docstring)."""
        return {"start": {"model": self.model, "merged": self.merged, "adapter": self.adapter},
                "base_model": self.base_model, "lineage": self.lineage}

    def describe(self) -> str:
        parts = [self.model] + [f"+ merged {a}" for a in self.merged]
        if self.adapter:
            parts.append(f"+ adapter {self.adapter} (trained further)")
        return " ".join(parts)


def resolve_start(model_name_or_path: str, adapter_name_or_path: str | None = None, mode: str = "auto",
                  peft_enabled: bool = False) -> Start:
    """Where a run starts (see the module docstring); raises UserError for a start that cannot be built."""
    model = result_folder(model_name_or_path)
    adapter = result_folder(adapter_name_or_path) if adapter_name_or_path else None
    for given, used in ((model_name_or_path, model), (adapter_name_or_path, adapter)):
        if given and used != given:
            logger.info("%s is a run folder: starting from its result %s", given, used)
    if is_adapter(model):
        if adapter:
            raise UserError(f"model_name_or_path {model} is itself a LoRA adapter, and adapter_name_or_path names "
                            f"another one ({adapter}); start from one of them: put the base model in "
                            "model_name_or_path, or leave adapter_name_or_path out")
        adapter, (model, inherited) = model, adapter_base(model)
        if not Path(model).exists() and not looks_like_hub_id(model):
            raise UserError(f"the adapter {adapter} was trained on {model!r}, which is neither a folder here nor a "
                            f"hub id. Point model_name_or_path at that base model and adapter_name_or_path at "
                            f"{adapter}.")
    elif adapter:
        if not is_adapter(adapter):
            raise UserError(f"adapter_name_or_path: {adapter} holds no {ADAPTER_CONFIG}, so it is not a LoRA adapter; "
                            "full weights go into model_name_or_path instead")
        trained_on, inherited = adapter_base(adapter)
        check_same_base(adapter, trained_on, model)
    else:
        inherited = []
    for earlier in inherited:
        if not is_adapter(earlier):
            raise UserError(f"the adapter {adapter} was trained on weights with {earlier} merged in, and that adapter "
                            "is gone; restore that run folder, or start from a merged export of the chain "
                            "(self_model/tools/export_model.py)")
    start = Start(model=absolute(model), merged=[absolute(a) for a in inherited])
    if adapter:
        if mode not in ("auto", "continue", "merge"):
            raise UserError(f"start_adapter: {mode!r} is not one of auto, continue, merge")
        continue_it = mode == "continue" or (mode == "auto" and peft_enabled)
        if continue_it and not peft_enabled:
            raise UserError("start_adapter: continue keeps training the starting LoRA adapter, which needs "
                            "peft.enabled: true; or set start_adapter: merge to merge it and train all weights")
        start.given_adapter = absolute(adapter)
        if continue_it:
            start.adapter = start.given_adapter
        else:
            start.merged.append(start.given_adapter)
    start.base_model, start.lineage = chain_before(start.given_adapter or start.model, start.model)
    return start


def chain_before(folder: str, model: str) -> tuple[str, list[dict[str, Any]]]:
    """(base model of the chain, previous runs oldest first) for a run starting from `folder`."""
    info = read_run_info(folder)
    kind = "adapter" if is_adapter(folder) else "full"
    if info is None:
        if kind == "full":
            return model, []  # a base model
        return model, [{"path": folder, "stage": None, "base": model, "kind": kind}]
    base = info.get("base_model") or (info.get("start") or {}).get("model") or model
    entry = {"path": folder, "stage": info.get("stage"), "base": (info.get("start") or {}).get("model", base),
             "kind": kind}
    return base, [*info.get("lineage", []), entry]


def start_of(cfg: Any) -> Start:
    """`resolve_start` for a stage config (model_name_or_path, adapter_name_or_path, start_adapter, peft)."""
    peft = getattr(cfg, "peft", None)
    return resolve_start(cfg.model_name_or_path, getattr(cfg, "adapter_name_or_path", None),
                         getattr(cfg, "start_adapter", "auto"), bool(peft and peft.enabled))


def stage_name(cfg: Any) -> str:
    """The stage a config class belongs to, from its name: PretrainConfig -> pretrain, DPOStageConfig -> dpo."""
    name = type(cfg).__name__
    for suffix in ("StageConfig", "Config"):
        if name.endswith(suffix) and name != suffix:
            return name[: -len(suffix)].lower()
    return name.lower()


def lineage_record(cfg: Any) -> dict[str, Any]:
    """What run_info.json records about the chain (empty for a config without a model)."""
    if not getattr(cfg, "model_name_or_path", None):
        return {"stage": stage_name(cfg)}
    return {"stage": stage_name(cfg), **start_of(cfg).record()}
