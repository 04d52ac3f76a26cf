"""What a run folder shows a person besides checkpoints: every logged step, the curves, and the model card.

    <output_dir>/metrics.jsonl   one JSON object per logged step (training and evaluation), as the trainer logged it
    <output_dir>/curves.png      loss, eval loss and learning rate against the step; redrawn at each save and at end
    final/README.md              the model card: base, data, key settings, final metrics, lineage, how to load it

Every stage gets them through the one lifecycle (`core.run.train_and_save` adds `RunRecordCallback`;
`core.run.save_final` writes the card), so no stage can forget them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("self_model")

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
MODEL_CARD = "README.md"


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def write_metrics(output_dir: str | Path, log_history: list[dict[str, Any]]) -> None:
    """metrics.jsonl from the trainer's whole log history (a resumed run rewrites it from the restored history, so
    the steps it repeats never appear twice)."""
    path = Path(output_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in log_history), encoding="utf-8")
    tmp.replace(path)


def draw_curves(output_dir: str | Path, log_history: list[dict[str, Any]]) -> Path | None:
    """curves.png: training loss and eval loss (left), learning rate (right), against the optimizer step."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for entry in log_history:
        for key in ("loss", "eval_loss", "learning_rate"):
            if isinstance(entry.get(key), (int, float)) and "step" in entry:
                steps, values = series.setdefault(key, ([], []))
                steps.append(entry["step"])
                values.append(float(entry[key]))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training node
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("loss", "training loss"), ("eval_loss", "eval loss")):
        if key in series:
            left.plot(*series[key], marker="o" if len(series[key][0]) < 30 else None, markersize=3, label=label)
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.legend()
    left.grid(alpha=0.3)
    if "learning_rate" in series:
        right.plot(*series["learning_rate"], color="#aa3377")
    right.set_xlabel("step")
    right.set_ylabel("learning rate")
    right.grid(alpha=0.3)
    fig.suptitle(Path(output_dir).name)
    fig.tight_layout()
    path = Path(output_dir) / CURVES_FILE
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def record_callback() -> Any:
    """A TrainerCallback keeping metrics.jsonl current at every log and the curves at every save and at the end."""
    from transformers import TrainerCallback

    class RunRecordCallback(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if _main_process():
                write_metrics(args.output_dir, state.log_history)  # a resume starts from the restored history

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if _main_process():
                write_metrics(args.output_dir, state.log_history)

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if _main_process():
                draw_curves(args.output_dir, state.log_history)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if _main_process():
                write_metrics(args.output_dir, state.log_history)
                draw_curves(args.output_dir, state.log_history)

    return RunRecordCallback()


# ---- the model card -----------------------------------------------------------------------------------------------
def _last(log_history: list[dict[str, Any]], key: str) -> Any:
    return next((entry[key] for entry in reversed(log_history) if key in entry), None)


def _data_lines(cfg: Any, results: dict[str, Any]) -> list[str]:
    data = getattr(cfg, "data", None) or getattr(cfg, "ppo", None)
    files = {key: getattr(data, key, None) for key in ("train_file", "eval_file")} if data is not None else {}
    lines = [f"- {key}: `{value}`" for key, value in files.items() if value]
    report = results.get("data_report.json") or {}
    counts = report.get("train_data") or report.get("train") or report.get("data", {}).get("train") or report
    if isinstance(counts, dict):
        shown = {k: v for k, v in counts.items() if k in ("rows_in", "rows_out", "pairs_out", "prompts_out", "blocks",
                                                          "tokens", "truncated", "dropped_too_long")}
        if shown:
            lines.append("- counts: " + ", ".join(f"{k} {v}" if not isinstance(v, dict) else
                                                  f"{k} mean {v.get('mean')} / max {v.get('max')}"
                                                  for k, v in shown.items()))
    return lines or ["- (see run_config.yaml)"]


def model_card(cfg: Any, written: Path, folder: Path, log_history: list[dict[str, Any]], results: dict[str, Any],
               run_info: dict[str, Any]) -> str:
    """The README.md of final/ (being `written` now, renamed to `folder`): what this model is, how it was made, and
    how to load it."""
    adapter = (written / "adapter_config.json").is_file()
    args = dict(getattr(cfg, "training_args", None) or {})
    peft = getattr(cfg, "peft", None)
    settings = {key: args[key] for key in ("learning_rate", "num_train_epochs", "max_steps",
                                           "per_device_train_batch_size", "gradient_accumulation_steps", "seed")
                if key in args}
    if peft is not None:
        settings["method"] = ("QLoRA" if peft.qlora else "LoRA") if peft.enabled else "full fine-tuning"
        if peft.enabled:
            settings["lora_r / alpha"] = f"{peft.lora_r} / {peft.lora_alpha}"
    metrics = {key: _last(log_history, key) for key in ("loss", "eval_loss", "eval_perplexity", "train_loss")}
    lineage = run_info.get("lineage") or []
    load = ("from peft import AutoPeftModelForCausalLM\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained(\"{folder}\")" if adapter else
            "from transformers import AutoModelForCausalLM\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"{folder}\")")
    lines = [f"# {Path(str(args.get('output_dir', folder.parent))).name}", "",
             f"{'A LoRA adapter on' if adapter else 'Full weights fine-tuned from'} `{cfg.model_name_or_path}`, "
             f"made by `{' '.join(run_info.get('command', [])[:1]) or 'self_model'}`.", "",
             "## Data", *_data_lines(cfg, results), "",
             "## Key settings", *[f"- {k}: {v}" for k, v in settings.items()], "",
             "## Final metrics", *[f"- {k}: {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))],
             "", "## Lineage"]
    lines += [f"- {step.get('stage', '?')}: `{step.get('path', step)}`" if isinstance(step, dict) else f"- {step}"
              for step in lineage] or [f"- base: `{cfg.model_name_or_path}`"]
    merged = (run_info.get("start") or {}).get("merged") or []
    if adapter and merged:  # peft's adapter_config.json names only the raw base: plain peft would skip the merges
        load = (f"# trained on {run_info['start'].get('model')} with {merged} merged into it first: peft alone would\n"
                "# load it onto the raw base. Use self_model/tools/chat.py or generate.py on this folder, or\n"
                "# export it:\n"
                "# uv run python self_model/tools/export_model.py --config config/self_model_config/export.yaml "
                f"model_name_or_path={folder}")
    lines += [f"- this run: `{folder}`", "", "## Load it", "", "```python",
              "from transformers import AutoTokenizer", f"tokenizer = AutoTokenizer.from_pretrained(\"{folder}\")",
              load, "```", "", "The tokenizer carries the chat template the model was trained with, and "
              "generation_config.json stops at its end-of-turn token(s). The whole config is in run_config.yaml, the "
              "versions and commit in run_info.json; the curves are in ../curves.png.", ""]
    return "\n".join(lines)
