"""The three kinds of evaluation on one loaded model: lm-evaluation-harness, perplexity, generation metrics.

lm-eval runs through its Python API (`simple_evaluate` on an `HFLM` wrapping the model this tool already loaded, so
an adapter is evaluated merged in memory, never merged on disk). Generation is scored with maintained packages that
lm-eval installs: ROUGE-L from `rouge-score` with a character tokenizer (its default tokenizer drops every
non-ASCII character, so Chinese would score 0) and BLEU from `sacrebleu` with its `zh` tokenizer (each CJK
character a token, other text split as in 13a). Both are character level for Chinese.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import yaml

from self_model.core.config import did_you_mean
from self_model.core.corpus import CorpusStats, iter_documents, resolve_corpus
from self_model.core.errors import UserError
from self_model.core.inference import GenerationSettings, TransformersEngine
from self_model.core.rows import length_stats
from self_model.tools.evaluate_config import ROOT, GenerationSection, HarnessSection, PerplexitySection
from self_model.tools.export_quantize import perplexity

logger = logging.getLogger("self_model")


# ---- lm-evaluation-harness ------------------------------------------------------------------------------------
def local_tasks(include_path: list[str]) -> dict[str, dict[str, Any]]:
    """The task YAMLs the project ships (name → config), their data files made absolute: lm-eval reads
    `data_files` relative to the working folder, the project's are relative to the repository root."""
    found: dict[str, dict[str, Any]] = {}
    for folder in map(Path, include_path):
        for path in sorted(folder.rglob("*.yaml")) if folder.is_dir() else []:
            config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            if not isinstance(config, dict) or not isinstance(config.get("task"), str):
                continue
            files = (config.get("dataset_kwargs") or {}).get("data_files")
            if isinstance(files, dict):
                config["dataset_kwargs"]["data_files"] = {k: _data_file(v, path) for k, v in files.items()}
            found[config["task"]] = config
    return found


def _data_file(value: str, yaml_path: Path) -> str:
    for base in (Path.cwd(), ROOT, yaml_path.parent):
        if (base / value).is_file():
            return str((base / value).resolve())
    raise UserError(f"{yaml_path}: data file {value!r} not found (relative to the repository root or the YAML)")


def resolve_tasks(section: HarnessSection) -> list[str | dict[str, Any]]:
    """Each task as lm-eval takes it: a local config dict, or a name from lm-eval's own task list; an unknown name
    is refused with lm-eval's closest names."""
    if not section.tasks:
        return []
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("harness.tasks needs lm-evaluation-harness: uv sync --extra eval (or set harness.tasks: [])")
    from lm_eval.tasks import TaskManager

    local = local_tasks(section.include_path)
    known: list[str] | None = None
    out: list[str | dict[str, Any]] = []
    for name in section.tasks:
        if name in local:
            out.append(local[name])
            continue
        known = known if known is not None else list(TaskManager().all_tasks)
        if name not in known:
            raise UserError(f"harness.tasks: unknown lm-eval task {name!r}{did_you_mean(name, [*local, *known])}; "
                            f"the project's local tasks: {sorted(local)}")
        out.append(name)
    return out


def run_harness(model: Any, tokenizer: Any, tasks: list[str | dict[str, Any]],
                section: HarnessSection) -> list[dict[str, Any]]:
    """One record per task and metric: value, stderr, task version, samples, the settings."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=section.batch_size)
    try:
        result = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=section.num_fewshot,
                                         limit=section.limit, apply_chat_template=section.apply_chat_template,
                                         log_samples=False, bootstrap_iters=1000)
    except (FileNotFoundError, ValueError, KeyError) as exc:  # lm-eval's way to say a task's data is not here
        raise UserError(f"lm-eval could not run {section.tasks}: {exc}") from None
    settings = {"num_fewshot": section.num_fewshot, "limit": section.limit,
                "apply_chat_template": section.apply_chat_template}
    records = []
    for task, metrics in result["results"].items():
        for key, value in metrics.items():
            metric, comma, fil = key.partition(",")  # "acc,none": metric, filter; "sample_len" is no metric
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{fil}")
            records.append({"kind": "lm_eval", "task": task, "metric": metric, "filter": fil, "value": value,
                            "stderr": stderr if isinstance(stderr, (int, float)) else None,
                            "version": result.get("versions", {}).get(task),
                            "samples": (result.get("n-samples", {}).get(task) or {}).get("effective"),
                            "settings": settings, "higher_is_better": metric not in ("perplexity",)})
    return records


# ---- perplexity -----------------------------------------------------------------------------------------------
def held_out_texts(section: PerplexitySection) -> list[str]:
    stats = CorpusStats()
    texts = list(iter_documents(resolve_corpus(section.files), section.text_fields, stats))
    stats.raise_if_bad("held-out text (perplexity.files)")
    return texts


def run_perplexity(model: Any, tokenizer: Any, texts: list[str], section: PerplexitySection) -> list[dict[str, Any]]:
    value, tokens = perplexity(model, tokenizer, texts, section.max_tokens, section.block_size)
    return [{"kind": "perplexity", "task": "perplexity", "metric": "perplexity", "value": value, "stderr": None,
             "version": "token-level, eos-joined", "samples": tokens, "higher_is_better": False,
             "settings": {"files": section.files, "max_tokens": section.max_tokens,
                          "block_size": section.block_size}}]


# ---- generation -------------------------------------------------------------------------------------------------
class CharTokenizer:
    """rouge-score's tokenizer interface: every non-space character is a token (Chinese at character level)."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text.lower() if not c.isspace()]


def score_answers(answers: list[str], references: list[str], refusal_markers: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CharTokenizer())
    rouge = [scorer.score(ref, ans)["rougeL"].fmeasure for ans, ref in zip(answers, references)]
    bleu = BLEU(tokenize="zh").corpus_score(answers, [references]).score
    lengths = length_stats([len(a) for a in answers])
    refusals = sum(any(m.lower() in a.lower() for m in refusal_markers) for a in answers)
    return {"rougeL_char": 100 * sum(rouge) / len(rouge), "bleu_zh": bleu, "answer_chars_mean": lengths["mean"],
            "answer_chars_p95": lengths["p95"], "empty_answers": 100 * sum(not a for a in answers) / len(answers),
            "refusal_rate": 100 * refusals / len(answers)}


GENERATION_BETTER = {"rougeL_char": True, "bleu_zh": True, "answer_chars_mean": None, "answer_chars_p95": None,
                     "empty_answers": False, "refusal_rate": False}


def run_generation(model: Any, tokenizer: Any, stops: list[int], prompts: list[dict[str, Any]],
                   section: GenerationSection) -> tuple[list[dict[str, Any]], list[str]]:
    from transformers import set_seed

    settings: GenerationSettings = section.settings
    set_seed(settings.seed)
    engine = TransformersEngine(model, tokenizer, stops)
    answers = engine.generate([p["messages"] for p in prompts], settings, section.batch_size)
    scores = score_answers(answers, [p["reference"] for p in prompts], section.refusal_markers)
    version = {"rougeL_char": "rouge-score ROUGE-L F1 x100, character tokens",
               "bleu_zh": "sacrebleu corpus BLEU, tokenize=zh (CJK characters)",
               "refusal_rate": "% of answers containing a refusal marker", "empty_answers": "% of empty answers"}
    records = [{"kind": "generation", "task": "generation", "metric": metric, "value": value, "stderr": None,
                "version": version.get(metric, "characters"), "samples": len(prompts),
                "higher_is_better": GENERATION_BETTER[metric],
                "settings": {"question_file": section.question_file, **vars(settings)}}
               for metric, value in scores.items()]
    return records, answers
