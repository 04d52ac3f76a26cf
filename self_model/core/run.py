"""What every training stage shares: backend arguments, the run folder, metrics, and saving the result.

Run folder (`training_args.output_dir`):
    run_config.yaml     the resolved config, secrets removed
    run_info.json       git commit, library versions, command line, data report
    checkpoint-N/       written by the trainer during training
    final/              only after training succeeded: weights or adapter, tokenizer with its
                        chat_template, generation_config, template JSON; its presence marks a finished run
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from self_model.core.attention import restore_sdpa
from self_model.core.config import ConfigError, redact, to_plain
from self_model.core.errors import UserError
from self_model.core.modeling import init_deepspeed_comm, pick_precision
from self_model.core.run_record import MODEL_CARD, draw_curves, model_card, record_callback, write_metrics

logger = logging.getLogger("self_model")

FINAL_DIR = "final"
LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "deepspeed",
             "wandb", "swanlab", "verl")


def build_training_args(training_args: dict[str, Any], args_cls: type, defaults: dict[str, Any] | None = None,
                        report_to: list[str] | None = None) -> Any:
    """Instantiate the backend's arguments class from the YAML section (already checked)."""
    values = dict(defaults or {})
    values.update(training_args)
    values.pop("resume_from_checkpoint", None)  # handled by prepare_output_dir
    pick_precision(values)
    values["report_to"] = report_to or []
    try:
        args = args_cls(**values)
    except (ValueError, TypeError) as exc:
        raise ConfigError([f"training_args: {args_cls.__name__} rejected the values: {exc}"]) from None
    check_sharding(args)
    init_deepspeed_comm(args)  # here, before any stage loads weights (ZeRO-3 partitions them while loading)
    # Every stage builds its arguments before loading weights: seeding here makes LoRA init, value/score heads and
    # resized embedding rows the same on every run (the Trainer's own set_seed comes after they are drawn).
    from transformers import enable_full_determinism, set_seed

    if getattr(args, "full_determinism", False):
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)
    return args


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---- the run folder ------------------------------------------------------------------------------------
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# The file the Trainer writes last into checkpoint-N/: without it the save was interrupted.
COMPLETE_MARK = "trainer_state.json"


def checkpoints(out: Path) -> list[Path]:
    """The run's checkpoint-N folders, newest first."""
    found = [p for p in out.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)] if out.is_dir() else []
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)), reverse=True)  # type: ignore[union-attr]


def last_complete_checkpoint(out: Path) -> str | None:
    """The newest checkpoint the Trainer finished writing; incomplete ones (killed while saving) are skipped."""
    for folder in checkpoints(out):
        if (folder / COMPLETE_MARK).is_file():
            return str(folder)
        logger.warning("skipping %s: it is incomplete (no %s; the run was stopped while saving it)", folder,
                       COMPLETE_MARK)
    return None


def prepare_output_dir(output_dir: str | Path, resume: str | bool | None) -> str | None:
    """Refuse to overwrite a finished or unfinished run unless asked to resume; return the checkpoint to resume."""
    out = Path(output_dir)
    if (out / FINAL_DIR).exists():
        raise UserError(f"{out} holds a finished run ({out / FINAL_DIR} exists); it is never overwritten. "
                        f"Choose another training_args.output_dir (e.g. training_args.output_dir={out}-2).")
    if resume in (None, False, ""):
        found = checkpoints(out)
        if found:
            raise UserError(f"{out} holds checkpoints of an unfinished run (last: {found[0]}). Continue it with "
                            "training_args.resume_from_checkpoint=auto, or choose another training_args.output_dir.")
        return None
    if resume in ("auto", True):
        last = last_complete_checkpoint(out)
        if last is None:
            logger.info("resume_from_checkpoint: auto found no complete checkpoint in %s; starting from scratch", out)
        else:
            logger.info("resuming from %s", last)
        return last
    if not Path(str(resume)).is_dir():
        raise UserError(f"training_args.resume_from_checkpoint: no such checkpoint folder: {resume}")
    if not (Path(str(resume)) / COMPLETE_MARK).is_file():
        raise UserError(f"training_args.resume_from_checkpoint: {resume} is incomplete (no {COMPLETE_MARK}: the run "
                        "was stopped while saving it); name an earlier checkpoint-N or use auto")
    return str(resume)


def library_versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_info(output_dir: str | Path, cfg: Any, extra: dict[str, Any] | None = None) -> None:
    """Everything needed to rerun: the resolved config (secrets removed), commit, versions, command line, and the
    chain of runs it starts from (`core.lineage`: stage, start, base_model, lineage)."""
    from self_model.core.lineage import lineage_record

    if not is_main_process():
        return
    out = Path(output_dir)
    chain = lineage_record(cfg)  # before the folder exists: a start that cannot be read leaves nothing behind
    out.mkdir(parents=True, exist_ok=True)
    plain = redact(to_plain(cfg))
    write_atomic(out / "run_config.yaml", yaml.safe_dump(plain, allow_unicode=True, sort_keys=False))
    info = {"git_commit": git_commit(), "versions": library_versions(), "python": sys.version.split()[0],
            "command": redact_argv(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S"), **chain,
            **(extra or {})}
    write_atomic(out / "run_info.json", json.dumps(info, indent=2, ensure_ascii=False))


def write_atomic(path: Path, text: str) -> None:
    """Write beside and rename: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def redact_argv(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] + "=***" if "api_key" in a.lower() or "token=" in a.lower() else a for a in argv]


# ---- metrics -------------------------------------------------------------------------------------------
class MetricsMixin:
    """Adds tokens/s (non-padding tokens) to training logs and perplexity to evaluation logs."""

    _last_tokens: int = 0
    _last_time: float | None = None
    # Perplexity is exp(eval loss) only for a language-model loss; a DPO trainer sets this to False.
    log_perplexity: bool = True

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:  # type: ignore[override]
        if "eval_loss" in logs:
            if self.log_perplexity:
                logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        elif "loss" in logs:
            now, tokens = time.perf_counter(), self.state.num_input_tokens_seen  # type: ignore[attr-defined]
            if self._last_time is not None and now > self._last_time:
                logs["tokens_per_second"] = round((tokens - self._last_tokens) / (now - self._last_time), 1)
            self._last_time, self._last_tokens = now, tokens
        super().log(logs, start_time)  # type: ignore[misc]

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._last_time = time.perf_counter()
        return super().train(*args, **kwargs)  # type: ignore[misc]


# ---- saving the result ---------------------------------------------------------------------------------
def save_final(trainer: Any, tokenizer: Any, template: Any, cfg: Any,
               extra_files: dict[str, Any] | None = None) -> Path:
    """Write final/ atomically (final.tmp then rename), so a crash never leaves something that looks finished."""
    out = Path(trainer.args.output_dir)
    tmp, final = out / (FINAL_DIR + ".tmp"), out / FINAL_DIR
    if trainer.is_world_process_zero() and tmp.exists():
        shutil.rmtree(tmp)
    trainer.model.config.use_cache = True  # turned off for training; generation wants it back
    restore_sdpa(trainer.model)
    full_state_dict_for_fsdp(trainer)
    trainer.save_model(str(tmp))  # every rank takes part (DeepSpeed ZeRO-3 gathers); only rank 0 writes
    if trainer.is_world_process_zero():
        from self_model.core.modeling import adapter_for_original_base

        adapter_for_original_base(trainer.model, tmp)  # PiSSA / OLoRA: an adapter for the original base (issue 18)
        if template is not None:  # continued pretraining trains plain text: no template
            template.apply_to_tokenizer(tokenizer)
            template.save_source(tmp)
        tokenizer.save_pretrained(str(tmp))
        save_generation_config(trainer.model, tokenizer, template, tmp)
        plain = redact(to_plain(cfg))
        (tmp / "run_config.yaml").write_text(yaml.safe_dump(plain, allow_unicode=True, sort_keys=False),
                                             encoding="utf-8")
        for name, payload in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
        info_file = out / "run_info.json"
        info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.exists() else {}
        if info:
            shutil.copy(info_file, tmp / "run_info.json")
        history = trainer.state.log_history  # with what the stage's finish() evaluated after training
        write_metrics(out, history)
        draw_curves(out, history)
        (tmp / MODEL_CARD).write_text(model_card(cfg, tmp, final, history, extra_files or {}, info), encoding="utf-8")
        tmp.rename(final)
    if trainer.accelerator.num_processes > 1:
        trainer.accelerator.wait_for_everyone()
    return final


def full_state_dict_for_fsdp(trainer: Any) -> None:
    """FSDP checkpoints may stay sharded (fast, resumable on as many processes); final/ must load with plain
    transformers / peft, and the Trainer writes no weights at all with a sharded state dict: gather them for it.
    (ZeRO-3 gathers through stage3_gather_16bit_weights_on_model_save, which preflight requires.)"""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if getattr(trainer, "is_fsdp_enabled", False) and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        plugin.set_state_dict_type("FULL_STATE_DICT")


def weights_partitioned(trainer: Any) -> bool:
    """Whether each process holds only part of the weights (FSDP, ZeRO-3): a forward pass on one rank alone hangs."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return bool(getattr(trainer, "is_fsdp_enabled", False) or (plugin is not None and plugin.zero_stage == 3))


def check_sharding(args: Any) -> None:
    """accelerate enables FSDP only on GPU-type processes: on CPU ones it drops the plugin and trains unsharded, and on
    one process transformers refuses with a traceback. Say so before any weights are loaded."""
    if not (getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"):
        return
    from accelerate.utils import DistributedType

    world = args.world_size  # sets up the processes' distributed state
    kind = args.distributed_state.distributed_type if args.distributed_state else DistributedType.NO
    if world < 2 or kind in (DistributedType.NO, DistributedType.MULTI_CPU):
        raise ConfigError([f"FSDP was asked for (training_args.fsdp or an accelerate FSDP config), but accelerate "
                           f"runs these {world} process(es) as {kind.value}, where it does not shard: FSDP needs 2 or "
                           "more GPU processes (torchrun / accelerate launch). On CPUs shard with DeepSpeed ZeRO-3 "
                           "(config/accelerate/zero3.yaml), or drop training_args.fsdp (plain DDP)."])


def log_effective_batch(trainer: Any, cfg: Any) -> None:
    """The global batch whatever the launcher (torchrun, accelerate, deepspeed): processes x per-device batch x
    accumulation, and the tokens per optimizer step (measured on the first rows; bounded by the length limit)."""
    args, data = trainer.args, getattr(cfg, "data", None)
    batch = args.world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps
    rows, columns = trainer.train_dataset, getattr(trainer.train_dataset, "column_names", None) or []
    ids = [c for c in columns if c.endswith("_ids") and c not in ("position_ids", "token_type_ids")]  # DPO: 3
    # data.max_length bounds a row of one sequence (not a DPO pair, nor GRPO's prompts: its replies are generated)
    limit = getattr(data, "block_size", None) or (getattr(data, "max_length", None) if len(ids) == 1 else None)
    mean = None
    if ids and hasattr(rows, "__len__") and len(rows):
        head = rows.select(range(min(len(rows), 1000)))
        mean = sum(len(x) for c in ids for x in head[c]) / len(head)
    tokens = [f"~{batch * mean:,.0f} (mean {mean:.1f} tokens per row, first {len(head)} rows)"] if mean else []
    tokens += [f"at most {batch * limit:,} ({limit} per row)"] if isinstance(limit, int) else []
    logger.info("effective batch: %d process(es) x %d per device x %d accumulation = %d rows per optimizer step; "
                "tokens per step: %s", args.world_size, args.per_device_train_batch_size,
                args.gradient_accumulation_steps, batch, ", ".join(tokens) or "not measured")


def save_generation_config(model: Any, tokenizer: Any, template: Any, folder: Path) -> None:
    """A generation config whose eos ids include the template's end-of-turn token(s)."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    gen = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
    stop = template.stop_token_ids(tokenizer) if template is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop:
        stop.append(tokenizer.eos_token_id)
    gen.eos_token_id = stop if len(stop) > 1 else (stop[0] if stop else None)
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.save_pretrained(str(folder))


DIVERGENCE_HINT = ("Usual causes: a learning rate too high for this model (training_args.learning_rate; also "
                   "check warmup_steps), or fp16 overflow (prefer training_args.bf16: true where the hardware has it, "
                   "or keep fp16 with a lower learning rate and training_args.max_grad_norm set).")


class RunInterrupted(UserError):
    """SIGTERM / SIGINT stopped training after a checkpoint was saved; exit code 128 + the signal's number."""
    label = "interrupted"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class RunGuard:
    """Stops training on SIGTERM / SIGINT (a cluster's preemption, Ctrl-C) after the step in progress, saving a
    checkpoint (a second signal stops at once); and on a non-finite loss or gradient norm, saving nothing more."""

    def __init__(self, patience: int = 1):
        self.patience = patience
        self.signum: int | None = None
        self.stopped_at: int | None = None  # the step the signal stopped
        self.bad_logs = 0
        self.diverged: tuple[int, str, float] | None = None  # (step, key, value)
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now, as without the guard
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.signum = signum
        logger.warning("%s received: saving a checkpoint at the end of this step, then stopping",
                       signal.Signals(signum).name)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if any_rank(self.signum is not None, args) and self.diverged is None:
            self.signum = self.signum or signal.SIGTERM  # another rank was signalled: stop at the same step
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> Any:
        if not logs or "loss" not in logs:
            return control  # evaluation logs are not training health
        # fp16's loss scaler skips steps whose gradients overflowed (inf norm) and lowers its scale: normal there.
        keys = ("loss",) if getattr(args, "fp16", False) else ("loss", "grad_norm")
        bad = [(k, float(logs[k])) for k in keys if isinstance(logs.get(k), (int, float)) and
               not math.isfinite(float(logs[k]))]
        if not bad:
            self.bad_logs = 0
            return control
        self.bad_logs += 1
        control.should_save = control.should_evaluate = False  # never checkpoint non-finite weights
        if self.bad_logs >= self.patience:
            self.diverged = (state.global_step, *bad[0])
            control.should_training_stop = True
        return control


def any_rank(flag: bool, args: Any) -> bool:
    """Whether any rank has the flag: all ranks stop at the same step (a rank stopping alone leaves the others
    waiting in a collective). One tiny all-reduce per step, only when distributed."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flag
    value = torch.tensor([int(flag)], device=args.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def run_guard(patience: int = 1) -> RunGuard:
    """A RunGuard that is a transformers TrainerCallback (imported here: importing the Trainer costs seconds)."""
    from transformers import TrainerCallback

    return type("RunGuard", (RunGuard, TrainerCallback), {})(patience)


def _stop_message(guard: RunGuard, out: Path, hint: str) -> UserError | None:
    last = last_complete_checkpoint(out)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
    if guard.diverged is not None:
        step, key, value = guard.diverged
        return UserError(f"training diverged at step {step} ({key} {value}, {guard.bad_logs} logged step(s) in a row; "
                         f"divergence_patience: {guard.patience}); training stopped, no final/ was written, {kept}. "
                         f"{hint} {DIVERGENCE_HINT}")
    if guard.stopped_at is not None:  # a signal after the last step: the run finished, final/ is written
        name = signal.Signals(guard.signum or signal.SIGTERM).name
        where = f"saved {last}" if last else "no checkpoint could be saved"
        return RunInterrupted(f"{name} stopped training at step {guard.stopped_at}: {where}; no final/ was written. "
                              "Resume with the same command plus training_args.resume_from_checkpoint=auto",
                              guard.signum)
    return None


def train_and_save(trainer: Any, cfg: Any, resume: str | None, tokenizer: Any, template: Any,
                   run_info: dict[str, Any], finish: Callable[[Any], dict[str, Any]] | None = None,
                   hint: str = "Lower the learning rate.") -> tuple[Path, dict[str, Any]]:
    """The lifecycle every stage shares once its run folder is prepared (`prepare_output_dir`) and its trainer built:

    run info -> train (stopped early by `RunGuard` on SIGTERM / SIGINT or a non-finite loss / gradient norm) ->
    refuse a stopped or diverged run (no final/) -> `finish(trainer)`, the stage's own results ({file name: JSON
    payload}, written into final/) -> final/ -> the tracker's run closed, also on failure.
    Returns final/ and the stage's results.
    """
    from self_model.core.tracking import finish_tracking

    log_effective_batch(trainer, cfg)
    write_run_info(trainer.args.output_dir, cfg, run_info)
    trainer.add_callback(record_callback())  # metrics.jsonl at every log, curves.png at every save
    guard = run_guard(getattr(cfg, "divergence_patience", 1))
    trainer.add_callback(guard)
    guard.install()
    try:
        trainer.train(resume_from_checkpoint=resume)
        stopped = _stop_message(guard, Path(trainer.args.output_dir), hint)  # every logged loss went past the guard
        if stopped is not None:
            raise stopped
        results = finish(trainer) if finish else {}
        return save_final(trainer, tokenizer, template, cfg, results), results
    finally:
        guard.uninstall()
        finish_tracking(cfg.trace)
