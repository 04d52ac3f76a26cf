"""Experiment tracking (`trace: none | wandb | swanlab`), configured by config/trace_config/<backend>.yaml.

API keys come from WANDB_API_KEY / SWANLAB_API_KEY first, then the file's `api_key`; a key only ever
goes into the environment of this process, never into a log line or the run folder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from self_model.core.config import load_config
from self_model.core.errors import UserError

logger = logging.getLogger("self_model")
TRACE_CONFIG_DIR = Path(__file__).resolve().parents[2] / "config" / "trace_config"


@dataclass
class WandbTraceConfig:
    project: str = "self_model"
    entity: str | None = None
    # auto: online when an API key is available, else offline (a run folder you can `wandb sync` later).
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    api_key: str | None = None


@dataclass
class SwanlabTraceConfig:
    project: str = "self_model"
    workspace: str | None = None
    # auto: online when an API key is available, else local (logs under the run folder). cloud: the original
    # guide's (and older swanlab's) name for online.
    mode: Literal["auto", "online", "cloud", "local", "offline", "disabled"] = "auto"
    api_key: str | None = None


def _trace_file(backend: str) -> Path | None:
    path = TRACE_CONFIG_DIR / f"{backend}.yaml"
    return path if path.is_file() else None


def setup_tracking(trace: str, output_dir: str, run_name: str) -> tuple[list[str], list[Any]]:
    """Return (report_to, extra callbacks) for the HF Trainer and prepare the backend's environment."""
    if trace == "none":
        return [], []
    if trace == "wandb":
        return _setup_wandb(output_dir, run_name), []
    if trace == "swanlab":
        return [], [_setup_swanlab(output_dir, run_name)]
    raise UserError(f"trace: unknown backend '{trace}'; expected none, wandb or swanlab")


def _require(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"trace: {module} is not installed; install the tracking extra: uv sync --extra trace")


def _setup_wandb(output_dir: str, run_name: str) -> list[str]:
    _require("wandb")
    cfg, mode, key = _wandb_settings()
    if key and "WANDB_API_KEY" not in os.environ:
        os.environ["WANDB_API_KEY"] = key
    os.environ["WANDB_PROJECT"] = cfg.project
    if cfg.entity:
        os.environ["WANDB_ENTITY"] = cfg.entity
    os.environ["WANDB_MODE"] = mode
    # The run's own folder, not a leftover of an earlier run in this process.
    os.environ["WANDB_DIR"] = output_dir
    os.environ["WANDB_NAME"] = run_name
    logger.info("tracking with wandb: project=%s mode=%s dir=%s", cfg.project, mode, os.environ["WANDB_DIR"])
    return ["wandb"]


def _swanlab_settings() -> tuple[SwanlabTraceConfig, str, str | None]:
    """The trace file, the mode it resolves to and the API key; raises when online mode has no key."""
    path = _trace_file("swanlab")
    cfg = load_config(SwanlabTraceConfig, path) if path else SwanlabTraceConfig()
    key = os.environ.get("SWANLAB_API_KEY") or cfg.api_key
    mode = {"auto": "online" if key else "local", "cloud": "online"}.get(cfg.mode, cfg.mode)
    if mode == "online" and not key:
        raise UserError(f"trace: swanlab with mode: {cfg.mode} needs an API key: export SWANLAB_API_KEY=... "
                        "(or set mode: local in config/trace_config/swanlab.yaml)")
    return cfg, mode, key


def _wandb_settings() -> tuple[WandbTraceConfig, str, str | None]:
    path = _trace_file("wandb")
    cfg = load_config(WandbTraceConfig, path) if path else WandbTraceConfig()
    key = os.environ.get("WANDB_API_KEY") or cfg.api_key
    mode = cfg.mode if cfg.mode != "auto" else ("online" if key else "offline")
    if mode == "online" and not key:
        raise UserError("trace: wandb with mode: online needs an API key: export WANDB_API_KEY=... "
                        "(or set mode: offline in config/trace_config/wandb.yaml)")
    return cfg, mode, key


def trace_problems(trace: str, path: str) -> list[str]:
    """Field check for `trace:`, run when the config loads (so also by --dry-run), before any model loads: the
    backend is installed, its config/trace_config/<backend>.yaml is valid, and an online mode has its key."""
    if trace == "none":
        return []
    try:
        _require(trace)
        _wandb_settings() if trace == "wandb" else _swanlab_settings()
    except UserError as exc:
        return [f"{path}: {str(exc).removeprefix('trace: ')}"]
    return []


def _setup_swanlab(output_dir: str, run_name: str) -> Any:
    _require("swanlab")
    cfg, mode, key = _swanlab_settings()
    if mode == "online":
        os.environ["SWANLAB_API_KEY"] = key  # type: ignore[assignment]
    # transformers' report_to=["swanlab"] fails with "No active Run" on some versions: use swanlab's callback.
    from swanlab.integration.transformers import SwanLabCallback

    log_dir = str(Path(output_dir) / "swanlog")
    logger.info("tracking with swanlab: project=%s mode=%s log_dir=%s", cfg.project, mode, log_dir)
    return SwanLabCallback(project=cfg.project, workspace=cfg.workspace, experiment_name=run_name, mode=mode,
                           log_dir=log_dir)


def finish_tracking(trace: str) -> None:
    """Close the tracker's run so a later run in the same process starts a new one in its own folder."""
    if trace == "wandb":
        import wandb

        if wandb.run is not None:
            wandb.finish()
        # wandb caches its settings (the run folder among them) per process until torn down.
        wandb.teardown()
