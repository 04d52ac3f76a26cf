"""Evaluate and compare models: lm-evaluation-harness tasks, perplexity on held-out text, generation metrics.

    uv run python self_model/tools/evaluate.py --config config/self_model_config/eval.yaml
    uv run python self_model/tools/evaluate.py --config ... 'models=[base_dir, runs/my-sft/final]' output_dir=out/cmp
    uv run python self_model/tools/evaluate.py --config ... harness.tasks=[cmedqa_mc] harness.limit=50 --dry-run

Models: run folders, a run's final/, exports, hub ids; an adapter is merged in memory (no merged copy on disk).
Output (written as <output_dir>.tmp, renamed when everything passed; never overwritten): eval_results.json (every
number with its model, task version and settings), eval_results.md, report.md + report.html (the table with the best
model of each row marked, a chart per metric, the answers side by side), charts/*.png, opencompass_config.py.
"""

from __future__ import annotations

import gc
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from self_model.core.cli import run_main
from self_model.core.errors import UserError
from self_model.core.inference import (
    ModelFolder,
    inspect_model,
    load_inference_model,
    load_inference_tokenizer,
    prompt_ids,
    stop_token_ids,
)
from self_model.tools.evaluate_config import EvalConfig
from self_model.tools.evaluate_report import meta_template, opencompass_config, write_report, write_results
from self_model.tools.evaluate_runs import held_out_texts, resolve_tasks, run_generation, run_harness, run_perplexity
from self_model.tools.generate import read_prompts

logger = logging.getLogger("self_model")


def read_questions(cfg: EvalConfig) -> list[dict[str, Any]]:
    """The questions with their reference answers (the last assistant turn); a row without one is refused."""
    section = cfg.generation
    prompts = read_prompts(section.question_file, section.format)
    missing = [p["source"] for p in prompts if not p.get("reference")]
    if missing:
        raise UserError(f"generation.question_file: {len(missing)} question(s) have no reference answer (a last "
                        f"assistant turn, or alpaca 'output'): {', '.join(missing[:5])}")
    return prompts


def load_model(path: str, cfg: EvalConfig, template: Any, need_template: bool) -> tuple[ModelFolder, Any, Any, list]:
    folder = inspect_model(path)
    tokenizer = load_inference_tokenizer(folder, None, cfg.trust_remote_code, need_template=False)
    used = None
    if need_template and not tokenizer.chat_template:  # main checked that `template` is set
        template.check_tokenizer(tokenizer)
        template.apply_to_tokenizer(tokenizer)
        used = template
    model = load_inference_model(folder, cfg.dtype, cfg.trust_remote_code)
    return folder, tokenizer, model, stop_token_ids(folder, tokenizer, used)


def evaluate_model(path: str, name: str, cfg: EvalConfig, template: Any, tasks: list, texts: list[str],
                   prompts: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    folder, tokenizer, model, stops = load_model(path, cfg, template, bool(prompts))
    info = {"name": name, "path": path, "kind": folder.kind, "base": folder.base,
            "meta_template": meta_template(tokenizer)}
    results: list[dict[str, Any]] = []
    answers: list[str] = []
    if tasks:
        results += run_harness(model, tokenizer, tasks, cfg.harness)
    if texts:
        results += run_perplexity(model, tokenizer, texts, cfg.perplexity)
    if prompts:
        for p in prompts:
            prompt_ids(tokenizer, p["messages"])  # a prompt longer than the context: refused before generating
        records, answers = run_generation(model, tokenizer, stops, prompts, cfg.generation)
        results += records
    del model
    gc.collect()
    return info, [{"model": name, **r} for r in results], answers


def main(cfg: EvalConfig, dry_run: bool = False) -> Path | None:
    from self_model.template.chat_template import load_template

    folders = [inspect_model(m) for m in cfg.models]  # a folder that is no model is refused before any work
    names = cfg.model_names()
    tasks = resolve_tasks(cfg.harness)
    texts = held_out_texts(cfg.perplexity) if cfg.perplexity.files else []
    prompts = read_questions(cfg) if cfg.generation.question_file else []
    template = load_template(cfg.template_path) if cfg.template_path else None
    if prompts and template is None:
        for folder in folders:  # before any model is loaded
            if not load_inference_tokenizer(folder, None, cfg.trust_remote_code, need_template=False).chat_template:
                raise UserError(f"{folder.path} has no chat template, and generation needs one: set template_path "
                                "to the template it was trained with (e.g. self_model/template/qwen2_chatml.json)")
    out = Path(cfg.output_dir)
    if dry_run:
        print("\n=== dry run: nothing is loaded or written ===")
        for name, folder in zip(names, folders):
            print(f"model {name}: {folder.path} ({folder.kind}" + (f" on {folder.base})" if folder.base else ")"))
        print(f"lm-eval tasks: {cfg.harness.tasks or 'none'}; perplexity: {len(texts)} texts from "
              f"{cfg.perplexity.files or 'none'}; generation: {len(prompts)} questions")
        print(f"output: {out}")
        return None
    if out.exists():
        raise UserError(f"output_dir: {out} exists; a report is never overwritten. Choose another output_dir.")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed evaluation's remains
    try:
        models, results, answers = [], [], {}
        for path, name in zip(cfg.models, names):
            logger.info("evaluating %s (%s)", name, path)
            info, records, model_answers = evaluate_model(path, name, cfg, template, tasks, texts, prompts)
            models.append(info)
            results += records
            answers[name] = model_answers
        shown = prompts[:cfg.generation.side_by_side]
        record = {"models": models, "results": results, "answers": [
            {"source": p["source"], "question": p["messages"][-1]["content"], "reference": p["reference"],
             "answers": {n: answers[n][i] for n in names}} for i, p in enumerate(shown)]}
        tmp.mkdir(parents=True)
        write_results(tmp, record)
        write_report(tmp, record)
        (tmp / "opencompass_config.py").write_text(opencompass_config(models), encoding="utf-8")
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nreport written to {out}/report.html\n")
    print((out / "eval_results.md").read_text(encoding="utf-8"))
    return out


def unshadow() -> None:
    """Run by path, this script's folder comes first on sys.path, and the script's name would shadow Hugging Face's
    `evaluate` package, which lm-eval's tasks import (squadv2, humaneval, xquad, ...): take the folder off. The
    project's modules import as `self_model.tools.*` and do not need it."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]


if __name__ == "__main__":
    unshadow()
    run_main(main, EvalConfig, __doc__)
