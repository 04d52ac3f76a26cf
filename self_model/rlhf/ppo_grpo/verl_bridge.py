"""PPO / GRPO with verl: the YAML as verl's own Hydra overrides, the prompts as verl's parquet, and the launch.

Nothing here re-implements verl: `verl_overrides` only translates `ppo:` keys into overrides of verl's
`ppo_trainer.yaml`; `validate_with_verl` composes that config with Hydra and runs the checks `verl.trainer.main_ppo`
runs before it starts Ray (they need no GPU); the launch is `python -m verl.trainer.main_ppo <overrides>`, the same
line written to `verl_overrides.txt` for a user to run on a GPU cluster.

Run folder (`ppo.output_dir`): run_config.yaml, run_info.json (with the overrides), data/train.parquet,
data/eval.parquet, tokenizer/ (with the template's chat_template), data_report.json, verl_overrides.txt; verl then
writes checkpoints/ (and hydra/).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from self_model.core.errors import ConfigError, UserError
from self_model.core.lineage import Start, result_folder, start_of
from self_model.rlhf.config import RLStageConfig, log_unread_sections
from self_model.rlhf.ppo_grpo import rewards
from self_model.rlhf.ppo_grpo.checks import kl_enabled

logger = logging.getLogger("self_model")
VERL_ENTRY = "verl.trainer.main_ppo"
OVERRIDES_FILE = "verl_overrides.txt"
VLLM_MAX_LORA_RANK = 512  # verl's fallback when vLLM is absent (vllm.config.lora.MaxLoRARanks)
_PLAIN = re.compile(r"^[\w./:@+-]+$")


def verl_installed() -> bool:
    return importlib.util.find_spec("verl") is not None


def why_verl_cannot_run_here() -> str | None:
    """None when verl can train on this machine; else the reason (verl missing, or no GPU for its rollout)."""
    if not verl_installed():
        return "verl is not installed in this environment (the rlhf extra)"
    import torch

    if not torch.cuda.is_available():
        return "this machine has no GPU (verl's vLLM / SGLang rollout and FSDP workers need CUDA GPUs)"
    return None


# ---- YAML -> overrides ----------------------------------------------------------------------------------------
def hydra_value(value: Any) -> str:
    """A Python value as Hydra override syntax (lists as [a,b], strings quoted only when they need it)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    return text if _PLAIN.match(text) else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _local(path: str) -> str:
    """An existing local path made absolute (Ray workers do not share our working directory); hub ids unchanged."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def _reward_spec(spec: str) -> str:
    parts = rewards.split_spec(spec)
    return spec if parts is None else f"{Path(parts[0]).resolve()}:{parts[1]}"


def verl_start(cfg: RLStageConfig) -> Start:
    """The start (core.lineage) as verl takes it: full weights from a folder, plus at most one LoRA adapter that
    training continues. verl merges nothing, so a start that needs an adapter merged in is refused with the fix."""
    start = start_of(cfg)
    if start.merged:
        raise UserError(f"ppo.backend: verl loads full weights (plus one LoRA adapter to keep training), but this "
                        f"start merges {', '.join(start.merged)} into {start.model}. Merge it once with uv run python "
                        "self_model/tools/export_model.py --config config/self_model_config/export.yaml "
                        f"model_name_or_path={start.merged[-1]} output_dir=<folder>, then set model_name_or_path to "
                        "that export; or keep peft.enabled: true with start_adapter: continue (an adapter trained on "
                        "plain base weights)")
    return start


def _lora(cfg: RLStageConfig, start: Start) -> dict[str, Any]:
    if not cfg.peft.enabled:
        return {}
    r, alpha, targets = cfg.peft.lora_r, cfg.peft.lora_alpha, cfg.peft.target_modules
    adapter = start.adapter
    if adapter and (Path(adapter) / "adapter_config.json").is_file():  # the adapter's own shape is what trains
        saved = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
        r, alpha, targets = saved.get("r", r), saved.get("lora_alpha", alpha), saved.get("target_modules", targets)
    out = {"lora_rank": r, "lora_alpha": alpha, "target_modules": sorted(targets) if isinstance(targets, list)
           else targets}
    if adapter:
        out["lora_adapter_path"] = _local(adapter)
    return out


def verl_overrides(cfg: RLStageConfig, run_dir: Path, tokenizer_dir: str, has_eval: bool) -> list[str]:
    """`ppo:` (and the shared model keys) as overrides of verl's ppo_trainer.yaml; extra_overrides win."""
    ppo, algorithm = cfg.ppo, cfg.algorithm
    start = verl_start(cfg)  # model_name_or_path may be a previous run's result (full weights or an adapter)
    run_dir, model = run_dir.resolve(), _local(start.model)
    gpus = ppo.n_gpus_per_node * ppo.nnodes
    micro = ppo.ppo_micro_batch_size_per_gpu
    values: dict[str, Any] = {
        "algorithm.adv_estimator": "grpo" if algorithm == "grpo" else "gae",
        "data.train_files": str(run_dir / "data" / "train.parquet"),
        "data.val_files": str(run_dir / "data" / ("eval.parquet" if has_eval else "train.parquet")),
        "data.prompt_key": "prompt",
        "data.max_prompt_length": ppo.max_prompt_length,
        "data.max_response_length": ppo.max_response_length,
        "data.train_batch_size": ppo.train_batch_size,
        "data.truncation": "error",  # over-long prompts were already refused or dropped (and counted)
        "actor_rollout_ref.model.path": model,
        "actor_rollout_ref.model.tokenizer_path": tokenizer_dir,
        "actor_rollout_ref.model.trust_remote_code": cfg.trust_remote_code,
        **{f"actor_rollout_ref.model.{k}": v for k, v in _lora(cfg, start).items()},
        "actor_rollout_ref.actor.optim.lr": ppo.actor_lr,
        "actor_rollout_ref.actor.ppo_mini_batch_size": ppo.ppo_mini_batch_size,
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": micro,
        "actor_rollout_ref.actor.use_kl_loss": kl_enabled(ppo, algorithm),
        "actor_rollout_ref.actor.kl_loss_coef": ppo.kl_loss_coef,
        "actor_rollout_ref.rollout.name": ppo.rollout_backend,
        "actor_rollout_ref.rollout.n": ppo.rollout_n,
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": micro,
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": micro,
    }
    if gpus < 2:  # verl's default rollout tensor parallelism (2) needs two GPUs
        values["actor_rollout_ref.rollout.tensor_model_parallel_size"] = 1
    if algorithm == "ppo":
        values.update({"critic.model.path": model, "critic.model.tokenizer_path": tokenizer_dir,
                       "critic.model.trust_remote_code": cfg.trust_remote_code, "critic.optim.lr": ppo.critic_lr,
                       "critic.ppo_micro_batch_size_per_gpu": micro})
    values.update(_reward_overrides(cfg))
    values.update({
        "trainer.project_name": "self_model",
        "trainer.experiment_name": run_dir.name,
        "trainer.logger": ppo.logger or (["console"] + ([cfg.trace] if cfg.trace != "none" else [])),
        "trainer.n_gpus_per_node": ppo.n_gpus_per_node,
        "trainer.nnodes": ppo.nnodes,
        "trainer.total_epochs": ppo.total_epochs,
        "trainer.default_local_dir": str(run_dir / "checkpoints"),
        "trainer.val_before_train": has_eval,
    })
    if ppo.total_training_steps:
        values["trainer.total_training_steps"] = ppo.total_training_steps
    return merge_overrides([f"{k}={hydra_value(v)}" for k, v in values.items()], ppo.extra_overrides)


def _reward_overrides(cfg: RLStageConfig) -> dict[str, Any]:
    reward = cfg.ppo.reward
    if reward.reward_model_name_or_path and not reward.functions:
        # A train_reward.py run folder means its final/ (full weights; its tokenizer carries the chat template).
        return {"reward.reward_model.enable": True, "reward.reward_model.model_path":
                _local(result_folder(reward.reward_model_name_or_path)),
                "reward.reward_model.rollout.name": cfg.ppo.rollout_backend}
    # verl loads this module by path and calls compute_score(..., **reward_kwargs): the weighted sum of the rewards.
    return {"reward.custom_reward_function.path": str(Path(rewards.__file__).resolve()),
            "reward.custom_reward_function.name": "compute_score",
            "+reward.custom_reward_function.reward_kwargs.rewards": [_reward_spec(s) for s in reward.functions],
            "+reward.custom_reward_function.reward_kwargs.weights": reward.weights or [1.0] * len(reward.functions)}


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(generated: list[str], extra: list[str]) -> list[str]:
    """The generated overrides, with any key that `extra_overrides` sets replaced by the user's value."""
    replaced = {_key(item) for item in extra}
    for item in generated:
        if _key(item) in replaced:
            logger.info("ppo.extra_overrides replaces the generated %s", item)
    return [item for item in generated if _key(item) not in replaced] + list(extra)


def command_line(overrides: list[str], run_dir: Path) -> str:
    """The shell command that launches verl with these overrides (one override a line), runnable with bash."""
    args = [f"hydra.run.dir={run_dir.resolve() / 'hydra'}", *overrides]
    head = ("# verl run written by self_model. Run it in the environment with verl and its rollout engine (README:\n"
            f"# GPU setup), e.g.: uv run --no-sync bash {run_dir.resolve() / OVERRIDES_FILE}\n")
    return head + " \\\n    ".join(["python -m " + VERL_ENTRY, *(shlex.quote(a) for a in args)]) + "\n"


# ---- the run folder -------------------------------------------------------------------------------------------
@dataclass
class VerlRun:
    run_dir: Path
    overrides: list[str]
    command: str


def prepare_verl_run(cfg: RLStageConfig, tokenizer: Any, template: Any, train_rows: list[dict[str, Any]],
                     eval_rows: list[dict[str, Any]] | None, report: dict[str, Any], validate: bool) -> VerlRun:
    """Check the overrides with verl (when `validate`), then write parquet, tokenizer, run info, verl_overrides.txt."""
    from self_model.core.run import FINAL_DIR, write_run_info
    from self_model.rlhf.ppo_grpo.data import verl_rows, write_parquet

    run_dir = Path(cfg.output_dir)
    if (run_dir / FINAL_DIR).exists():
        raise UserError(f"{run_dir} holds a finished run ({run_dir / FINAL_DIR} exists); it is never overwritten. "
                        f"Choose another ppo.output_dir (e.g. ppo.output_dir={run_dir}-2).")
    tokenizer_dir = str((run_dir / "tokenizer").resolve())
    template.apply_to_tokenizer(tokenizer)  # verl renders prompts with the tokenizer's chat_template
    tokenizer.save_pretrained(tokenizer_dir)  # first: verl's validation loads it (PPO's critic config)
    overrides = verl_overrides(cfg, run_dir, tokenizer_dir, has_eval=bool(eval_rows))
    if validate:
        validate_with_verl(overrides)
    write_parquet(verl_rows(train_rows, "train"), run_dir / "data" / "train.parquet")
    if eval_rows:
        write_parquet(verl_rows(eval_rows, "test"), run_dir / "data" / "eval.parquet")
    command = command_line(overrides, run_dir)
    (run_dir / OVERRIDES_FILE).write_text(command, encoding="utf-8")
    (run_dir / "data_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    write_run_info(run_dir, cfg, {"backend": "verl", "algorithm": cfg.algorithm, "verl_overrides": overrides,
                                  "data": report})
    return VerlRun(run_dir, overrides, command)


def run_verl(cfg: RLStageConfig, dry_run: bool = False) -> Path | None:
    """The whole verl path: data -> run folder -> verl's own validation -> launch (unless prepare_only / dry run)."""
    from self_model.rlhf.ppo_grpo.data import load_prompt_data

    ppo = cfg.ppo
    log_unread_sections(cfg, f"train_{cfg.algorithm}.py (verl)",
                        f"output: ppo.output_dir={cfg.output_dir}, learning rate: ppo.actor_lr")
    (tokenizer, template), train, eval_, data = load_prompt_data(cfg)
    logger.info("train prompts: %s", data["train"])
    if dry_run:
        run_dir = Path(cfg.output_dir)
        overrides = verl_overrides(cfg, run_dir, str((run_dir / "tokenizer").resolve()), has_eval=bool(eval_))
        print(f"\n=== dry run: nothing is written or launched ===\n{cfg.algorithm.upper()} with verl; data {data}")
        print(f"verl command (a real run writes it to {run_dir / OVERRIDES_FILE}):")
        print(command_line(overrides, run_dir))
        return None
    installed = verl_installed()
    if not installed:
        logger.warning("verl is not installed here: the config passed self_model's checks (verl's batch rules "
                       "included); verl validates it again when it starts")
    run = prepare_verl_run(cfg, tokenizer, template, train, eval_, data, validate=installed)
    print(f"\nverl run folder: {run.run_dir}\n  data/train.parquet ({data['train']['prompts_out']} prompts)"
          f"{', data/eval.parquet' if eval_ else ''}, tokenizer/, run_info.json\n"
          f"  {OVERRIDES_FILE}: the verl command line; run it where verl, vLLM and the GPUs are: "
          f"uv run --no-sync bash {run.run_dir / OVERRIDES_FILE}")
    if ppo.prepare_only:
        return run.run_dir
    if reason := why_verl_cannot_run_here():
        # The guide's PPO command on a laptop: the complete verl job is written; say exactly what to run where.
        print(f"\nverl cannot train here: {reason}. The complete job is in {run.run_dir}. On a machine with GPUs "
              f"and this checkout (see README, 'GPU setup'):\n  uv sync --extra rlhf && uv pip install "
              f"\"verl[vllm]==0.9.1\"\n  uv run --no-sync bash {run.run_dir / OVERRIDES_FILE}\n"
              f"(ppo.n_gpus_per_node={ppo.n_gpus_per_node}, ppo.nnodes={ppo.nnodes}; set ppo.prepare_only: true to "
              "skip this message)")
        return run.run_dir
    launch_verl(run)
    print(f"\nverl finished; checkpoints in {run.run_dir / 'checkpoints'}. To a Hugging Face model: python -m "
          f"verl.model_merger merge --backend fsdp --local_dir {run.run_dir}/checkpoints/global_step_<N>/actor "
          f"--target_dir {run.run_dir}/final")
    return run.run_dir


# ---- verl's own checks, and the launch --------------------------------------------------------------------------
def compose_verl_config(overrides: list[str]) -> Any:
    """verl's ppo_trainer.yaml composed with the overrides by Hydra (no Ray, no GPU)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    found = importlib.util.find_spec("verl")
    config_dir = Path(list(found.submodule_search_locations)[0]) / "trainer" / "config"  # type: ignore[union-attr]
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            return compose(config_name="ppo_trainer", overrides=[o for o in overrides if not o.startswith("hydra.")])
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(["verl's Hydra config rejected the overrides: " + " ".join(str(exc).split())]) from None


def validate_with_verl(overrides: list[str]) -> Any:
    """What main_ppo checks before it starts Ray (verl's validate_config, which also builds the actor and, for PPO,
    the critic config), plus verl's algorithm and rollout dataclasses; a rejection is a ConfigError with verl's reason.

    One of verl's checks imports vLLM (the LoRA rank vLLM can serve); without vLLM (a CPU machine) that check runs
    here against verl's fallback list of ranks and validate_config sees the config without the LoRA rank."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    config = compose_verl_config(overrides)
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config
    from verl.utils.device import auto_set_device

    checked, problems = config, []
    rank = config.actor_rollout_ref.model.get("lora_rank", 0)
    if rank > 0 and config.actor_rollout_ref.rollout.name == "vllm" and importlib.util.find_spec("vllm") is None:
        if rank > VLLM_MAX_LORA_RANK:
            problems.append(f"actor_rollout_ref.model.lora_rank: vLLM serves LoRA ranks up to {VLLM_MAX_LORA_RANK}, "
                            f"got {rank} (peft.lora_r or the adapter's r)")
        checked = OmegaConf.create(OmegaConf.to_container(config))
        with open_dict(checked):
            checked.actor_rollout_ref.model.lora_rank = 0
        logger.info("vLLM is not installed here: verl's LoRA-rank check ran against its fallback list")
    try:
        auto_set_device(checked)
        with warnings.catch_warnings():  # "Disabled critic as algorithm.adv_estimator != gae": GRPO has none
            warnings.simplefilter("ignore", UserWarning)
            use_critic = need_critic(checked)
        validate_config(config=checked, use_reference_policy=need_reference_policy(checked), use_critic=use_critic)
        for section in (checked.algorithm, checked.actor_rollout_ref.rollout):
            omega_conf_to_dataclass(section)
    except (AssertionError, ValueError, TypeError, KeyError, OSError, HydraException, OmegaConfBaseException) as exc:
        problems.append("verl's config validation rejected the generated config: " + " ".join(str(exc).split()))
    if problems:
        raise ConfigError(problems + ["(the README section 'PPO and GRPO' lists what each ppo.* key sets in verl; "
                                      "ppo.extra_overrides can set any other verl key)"])
    return config


def launch_verl(run: VerlRun) -> None:
    """Run `python -m verl.trainer.main_ppo <overrides>` (the line in verl_overrides.txt) in this environment."""
    args = [sys.executable, "-m", VERL_ENTRY, f"hydra.run.dir={run.run_dir.resolve() / 'hydra'}", *run.overrides]
    logger.info("launching verl: %s", " ".join(args[:3]) + " ... (see %s)" % (run.run_dir / OVERRIDES_FILE))
    result = subprocess.run(args, env={**os.environ, "HYDRA_FULL_ERROR": "1"}, check=False)
    if result.returncode != 0:
        raise UserError(f"verl exited with code {result.returncode} (its output is above); nothing was saved as a "
                        f"result. The exact command is in {run.run_dir / OVERRIDES_FILE}")
