"""The stage kinds a pipeline can run: what each needs from the stages before it, which keys of its own YAML the
pipeline sets (its wiring), what it leaves behind, when it is finished, and the number that shows it worked.

Every kind runs its entry script's `main(cfg)` in this process (one import of torch / transformers for the whole
pipeline); its config is loaded by the script's own dataclass with the strict loader, so a pipeline stage accepts
exactly the keys its script accepts. Nothing here imports torch at module level: `--dry-run` stays light.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from self_model.core.errors import UserError

Form = Literal["full", "adapter", "quantized"]


@dataclass
class Produced:
    """What the stages so far have made: the next stage starts from these."""

    model: str  # the model to start from: the base, a run folder, an export
    model_form: Form = "full"
    model_by: str = "base_model"  # the stage that made it ("base_model" for the chain's start)
    tokenizer: str | None = None  # set when the model's tokenizer lives elsewhere (a base, a grown vocabulary)
    corpus: list[str] | None = None  # cleaned plain text (a process_data stage)
    corpus_by: str | None = None
    models: list[tuple[str, str]] = field(default_factory=list)  # (stage, model) of every model so far, base first


@dataclass
class Metric:
    """One summary row's evidence: a name, before -> after (after alone when there is no before)."""

    name: str
    before: float | None
    after: float | str | None
    source: str  # the file it was read from


@dataclass(frozen=True)
class Kind:
    name: str
    config_class: str  # "module:Class": the dataclass of the stage's YAML
    entries: tuple[str, ...]  # "module:function", called in order with (cfg)
    example_config: str
    accepts: tuple[Form, ...] = ("full", "adapter")  # model forms it can start from
    needs_config: bool = True
    wire: Callable[[Produced, Path], dict[str, Any]] = lambda p, out: {}
    done_file: str = "final/run_info.json"  # relative to the stage folder: present only when the stage finished
    metric: Callable[[Path], Metric | None] = lambda out: None

    def load_class(self) -> type:
        module, name = self.config_class.split(":")
        return getattr(importlib.import_module(module), name)

    def run(self, cfg: Any) -> None:
        for entry in self.entries:
            module, name = entry.split(":")
            getattr(importlib.import_module(module), name)(cfg)

    def is_done(self, out: Path) -> bool:
        return (out / self.done_file).is_file()


# ---- reading what a finished stage wrote ------------------------------------------------------------------------

def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def logged(out: Path, key: str) -> list[float]:
    """Every value of `key` in the run's metrics.jsonl (each logged step, evaluations included), in order."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [float(r[key]) for r in rows if key in r]


def first_last(out: Path, key: str, name: str) -> Metric | None:
    values = logged(out, key)
    return Metric(name, values[0], values[-1], str(out / "metrics.jsonl")) if values else None


def data_metric(out: Path) -> Metric:
    report = read_json(out / "report.json")
    return Metric("rows kept", report["rows_in"], report["rows_out"], str(out / "report.json"))


def vocab_metric(out: Path) -> Metric:
    ext = read_json(out / "merged_model" / "vocab_extension.json")
    counts = ext["tokens_per_char"].get("held_out") or ext["tokens_per_char"]["train"]
    return Metric("tokens per character", counts["tokens_per_char_before"], counts["tokens_per_char_after"],
                  str(out / "merged_model" / "vocab_extension.json"))


def pretrain_metric(out: Path) -> Metric | None:
    evals = read_json(out / "final" / "eval_results.json")
    if not evals:
        return None
    return Metric("eval perplexity", evals[0]["eval_perplexity"], evals[-1]["eval_perplexity"],
                  str(out / "final" / "eval_results.json"))


def grpo_metric(out: Path) -> Metric | None:
    report = read_json(out / "final" / "data_report.json")
    if "eval_after" in report:
        return Metric("eval reward", report["eval_before"].get("eval_reward"), report["eval_after"].get("eval_reward"),
                      str(out / "final" / "data_report.json"))
    return Metric("train reward (last)", None, report.get("train", {}).get("reward"),
                  str(out / "final" / "data_report.json"))


def export_metric(out: Path) -> Metric | None:
    report = read_json(out / "export_report.json")
    quant = report.get("quantization") or {}
    if quant.get("perplexity_before") is not None:
        return Metric(f"{quant['method']} perplexity", quant["perplexity_before"], quant["perplexity_after"],
                      str(out / "export_report.json"))
    return Metric("merge check: largest logit difference", None, report["check"]["max_abs_diff"],
                  str(out / "export_report.json"))


def eval_metric(out: Path) -> Metric | None:
    results = read_json(out / "eval_results.json").get("results", [])
    rouge = [r for r in results if r.get("metric") == "rougeL_char"]
    if not rouge:
        return None
    return Metric(f"rougeL_char {rouge[0]['model']} -> {rouge[-1]['model']}", rouge[0]["value"], rouge[-1]["value"],
                  str(out / "eval_results.json"))


def chat_metric(out: Path) -> Metric:
    answers = read_json(out / "answers.json")
    return Metric("answers", None, answers[0]["answer"] if answers else "", str(out / "answers.json"))


# ---- wiring: the keys a stage gets from the ones before it ------------------------------------------------------

def start_keys(p: Produced) -> dict[str, Any]:
    """A training stage starts from the previous model; its tokenizer is the model's own unless it lives elsewhere
    (a base from the hub, a grown vocabulary): a run folder carries the tokenizer it was trained with."""
    return {"model_name_or_path": p.model, "adapter_name_or_path": None, "tokenizer_name_or_path": p.tokenizer}


def wire_data(p: Produced, out: Path) -> dict[str, Any]:
    # The pipeline owns the folder: a stage found unfinished is redone.
    return {"output_dir": str(out.parent), "subdir": out.name, "overwrite": True}


def wire_vocab(p: Produced, out: Path) -> dict[str, Any]:
    keys = {"base_tokenizer": p.tokenizer or p.model, "base_model": p.model, "overwrite": True,
            "train.output_dir": str(out / "domain_tokenizer"), "merge.output_dir": str(out / "merged_tokenizer"),
            "resize.output_dir": str(out / "merged_model")}
    if p.corpus:
        keys["corpus.train_file"] = p.corpus
    return keys


def wire_pretrain(p: Produced, out: Path) -> dict[str, Any]:
    keys = {**start_keys(p), "training_args.output_dir": str(out), "training_args.resume_from_checkpoint": "auto",
            "data.cache_dir": str(out.parent / ".cache" / out.name)}
    if p.corpus:
        keys["data.train_file"] = p.corpus
    return keys


def wire_trainer(p: Produced, out: Path) -> dict[str, Any]:
    return {**start_keys(p), "training_args.output_dir": str(out), "training_args.resume_from_checkpoint": "auto"}


def wire_grpo(p: Produced, out: Path) -> dict[str, Any]:
    return {**start_keys(p), "ppo.output_dir": str(out), "ppo.trl_args.resume_from_checkpoint": "auto"}


def wire_export(p: Produced, out: Path) -> dict[str, Any]:
    return {"model_name_or_path": p.model, "adapter_name_or_path": None, "output_dir": str(out)}


def wire_evaluate(p: Produced, out: Path) -> dict[str, Any]:
    return {"models": [m for _, m in p.models], "names": [n for n, _ in p.models], "output_dir": str(out)}


def wire_chat(p: Produced, out: Path) -> dict[str, Any]:
    return {"model_name_or_path": p.model, "output_dir": str(out)}


TRAINER = ("full", "adapter")
KINDS: dict[str, Kind] = {k.name: k for k in [
    Kind("process_data", "data_process.dataproc.options:ProcessConfig", ("data_process.process_data:main",),
         "config/data_config/process.yaml", accepts=("full", "adapter", "quantized"), wire=wire_data,
         done_file="report.json", metric=data_metric),
    Kind("vocab", "tokenizer.vocab.extend:ExtendConfig",
         ("tokenizer.train_domain_tokenizer:main", "tokenizer.merge_tokenizer:main", "tokenizer.resize_model:main"),
         "config/tokenizer_config/extend.yaml", accepts=("full",), wire=wire_vocab,
         done_file="merged_model/vocab_extension.json", metric=vocab_metric),
    Kind("pretrain", "self_model.pretrain.config:PretrainConfig", ("self_model.pretrain.train_pretrain:main",),
         "config/self_model_config/pretrain.yaml", accepts=TRAINER, wire=wire_pretrain, metric=pretrain_metric),
    Kind("finetune", "self_model.fine_tuning.config:FinetuneConfig", ("self_model.fine_tuning.train_finetune:main",),
         "config/self_model_config/finetune.yaml", accepts=TRAINER, wire=wire_trainer,
         metric=lambda out: first_last(out, "eval_loss", "eval loss")),
    Kind("dpo", "self_model.rlhf.config:DPOStageConfig", ("self_model.rlhf.train_dpo:main",),
         "config/self_model_config/rlhf.yaml", accepts=TRAINER, wire=wire_trainer,
         metric=lambda out: first_last(out, "eval_rewards/accuracies", "eval reward accuracy")),
    Kind("grpo", "self_model.rlhf.config:GRPOStageConfig", ("self_model.rlhf.train_grpo:main",),
         "config/self_model_config/rlhf.yaml", accepts=TRAINER, wire=wire_grpo, metric=grpo_metric),
    Kind("export", "self_model.tools.export_config:ExportConfig", ("self_model.tools.export_model:main",),
         "config/self_model_config/export.yaml", accepts=TRAINER, wire=wire_export, done_file="export_report.json",
         metric=export_metric),
    Kind("evaluate", "self_model.tools.evaluate_config:EvalConfig", ("self_model.tools.evaluate:main",),
         "config/self_model_config/eval.yaml", accepts=("full", "adapter", "quantized"), wire=wire_evaluate,
         done_file="eval_results.json", metric=eval_metric),
    Kind("chat", "self_model.tools.pipeline_chat:ChatStageConfig", ("self_model.tools.pipeline_chat:main",),
         "(none: overrides only)", accepts=("full", "adapter", "quantized"), needs_config=False, wire=wire_chat,
         done_file="answers.json", metric=chat_metric),
]}


def output_form(kind: Kind, cfg: Any, start: Produced) -> Form | None:
    """The form of the model a stage leaves (None: it leaves no model), from its loaded config."""
    if kind.name in ("pretrain", "finetune", "dpo", "grpo"):
        return "adapter" if cfg.peft.enabled else "full"
    if kind.name == "export":
        return "full" if cfg.quantize.method == "none" else "quantized"
    if kind.name == "vocab":
        return "full"
    return None


def finished_form(kind: Kind, out: Path) -> Form | None:
    """The form of the model a finished stage left, read from its folder (its config is not loaded again: an export's
    or evaluation's own check refuses an output folder that exists)."""
    if kind.name in ("pretrain", "finetune", "dpo", "grpo"):
        return "adapter" if (out / "final" / "adapter_config.json").is_file() else "full"
    if kind.name == "export":
        return "quantized" if "quantization_config" in read_json(out / "config.json") else "full"
    return "full" if kind.name == "vocab" else None


def after(kind: Kind, name: str, out: Path, cfg: Any, p: Produced) -> Produced:
    """What the stages have made once this one finished (cfg None: it finished in an earlier run)."""
    if kind.name == "process_data":
        return replace(p, corpus=[str(out / "train.jsonl")], corpus_by=name)
    form = output_form(kind, cfg, p) if cfg is not None else finished_form(kind, out)
    if form is None:
        return p
    # A training run's result is its final/ (the run folder works as a start too, but not as a model to evaluate).
    model = str(out / "merged_model" if kind.name == "vocab" else out if kind.name == "export" else out / "final")
    # A run folder and an export carry their tokenizer (a grown vocabulary and the chat template included).
    return replace(p, model=model, model_form=form, model_by=name, tokenizer=None, models=[*p.models, (name, model)])


def refuse_start(kind: Kind, name: str, p: Produced) -> str | None:
    """Why this stage cannot start from what the stages before it produce (None: it can)."""
    if p.model_form in kind.accepts:
        return None
    made = f"stage '{p.model_by}'" if p.model_by != "base_model" else "base_model"
    if p.model_form == "quantized":
        return (f"stage '{name}' ({kind.name}) needs a model it can {'train' if kind.accepts == TRAINER else 'read'} "
                f"at full precision, but {made} leaves a quantized model; move '{name}' before the quantizing "
                "export, or give that export quantize.method: none")
    return (f"stage '{name}' ({kind.name}) needs full weights (a model folder with config.json), but {made} leaves "
            f"a LoRA adapter; put an export stage (kind: export, it merges the adapter) before '{name}', or train "
            f"'{p.model_by}' with peft.enabled: false")


def check_kind(name: str) -> Kind:
    if name not in KINDS:
        from self_model.core.config import did_you_mean

        raise UserError(f"unknown stage kind '{name}'{did_you_mean(name, KINDS)}; known: {sorted(KINDS)}")
    return KINDS[name]
