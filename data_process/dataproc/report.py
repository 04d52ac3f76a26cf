"""report.json, report.md and lengths.png: what each step removed and why, duplicate clusters, lengths.

The counts are built so they add up: rows read = malformed + every cleaning rule + exact duplicates +
near duplicates + train + validation (a test holds the report to that).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data_process.dataproc.clean import CLEAN_RULES, RULES
from data_process.dataproc.normalize import content
from self_model.core.errors import UserError
from self_model.core.rows import length_stats

if TYPE_CHECKING:
    from data_process.dataproc.options import ProcessConfig
    from data_process.dataproc.pipeline import Collected, Outcome

MEMBERS_SHOWN = 3


def load_tokenizer(name: str) -> Any:
    """A folder with tokenizer.json is read by the `tokenizers` library directly: the same ids as the
    transformers wrapper for token counting, without the seconds its import costs. Anything else (a hub
    id, a slow tokenizer) goes through AutoTokenizer."""
    if (Path(name) / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(Path(name) / "tokenizer.json"))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise UserError(f"--tokenizer {name}: cannot load a tokenizer from it ({exc}); give a local tokenizer "
                        "folder (with tokenizer.json or tokenizer_config.json) or a hub id") from None


def count_tokens(tokenizer: Any, texts: list[str]) -> list[int]:
    # Batch calls: the Rust tokenizer encodes a batch on all cores.
    if hasattr(tokenizer, "encode_batch"):
        return [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _stats(values: np.ndarray) -> dict[str, Any]:
    if not len(values):
        return {"count": 0}
    counts, edges = np.histogram(values, bins=min(30, max(1, len(np.unique(values)))))
    return {"count": int(len(values)), **length_stats(values.tolist()),
            "histogram": {"edges": [round(float(e), 1) for e in edges], "counts": counts.tolist()}}


def _snippet(outcome: Outcome, i: int) -> str:
    with open(outcome.stage, "rb") as fh:
        fh.seek(outcome.offsets[i])
        return content(json.loads(fh.readline()))[:200]


def _clusters(out: Collected, outcome: Outcome, rep: np.ndarray, limit: int,
              similarity: np.ndarray | None = None) -> dict[str, Any]:
    """The largest clusters (the kept row and the rows removed as its duplicates), with their text."""
    removed = np.flatnonzero(rep != np.arange(len(rep)))
    heads, sizes = np.unique(rep[removed], return_counts=True)
    order = np.lexsort((heads, -sizes))[:limit]
    shown = []
    for head, size in zip(heads[order], sizes[order]):
        members = []
        for m in np.flatnonzero(rep == head)[1: MEMBERS_SHOWN + 1]:  # [0] is the head: the smallest index
            entry: dict[str, Any] = {"source": outcome.source(out, m), "text": _snippet(outcome, m)}
            if similarity is not None:
                entry["similarity"] = round(float(similarity[np.searchsorted(outcome.after_exact, m)]), 3)
            members.append(entry)
        shown.append({"size": int(size) + 1, "kept": {"source": outcome.source(out, head),
                                                       "text": _snippet(outcome, head)}, "removed": members})
    return {"clusters": int(len(heads)), "rows_removed": int(len(removed)), "largest": shown}


def build(cfg: ProcessConfig, out: Collected, outcome: Outcome) -> dict[str, Any]:
    rows_in = sum(f.rows for f in out.inputs.files)
    n_ok = out.rows_ok
    exact_removed = int((outcome.exact != np.arange(n_ok)).sum())
    near = outcome.near
    near_removed = int(near.removed.sum()) if near is not None else 0
    after_read = rows_in - out.removed["malformed"]
    steps = [
        {"step": "read", "rows_in": rows_in, "removed": {"malformed": out.removed["malformed"]},
         "rows_out": after_read},
        {"step": "clean", "rows_in": after_read, "removed": {rule: out.removed[rule] for rule in RULES},
         "rows_out": n_ok},
        {"step": "exact_dedup", "enabled": cfg.dedup, "rows_in": n_ok, "removed": {"exact_duplicate": exact_removed},
         "rows_out": n_ok - exact_removed},
        {"step": "near_dedup", "enabled": cfg.near_dedup, "rows_in": n_ok - exact_removed,
         "removed": {"near_duplicate": near_removed}, "rows_out": outcome.kept},
        {"step": "split", "rows_in": outcome.kept, "train": outcome.kept - outcome.validation,
         "validation": outcome.validation, "rows_out": outcome.kept},
    ]
    examples = {**out.examples, **outcome.dup_examples}
    report: dict[str, Any] = {
        "kind": out.kind,
        "inputs": [{"path": str(f.path), "format": f.format, "rows": f.rows, "blank_lines": f.blank_lines}
                   for f in out.inputs.files],
        "rows_in": rows_in, "rows_out": outcome.kept, "steps": steps,
        "characters_changed": _changes(cfg, out),
        "rejected_examples": {rule: rows for rule, rows in examples.items() if rows},
        "lengths": {"chars": _stats(outcome.chars)},
        "options": dataclasses.asdict(cfg), "timing": outcome.timing,
        "outputs": {name: str(cfg.out_dir / name) for name in _output_names(cfg, outcome.validation)},
    }
    if outcome.tokens is not None:
        report["lengths"]["tokens"] = {**_stats(outcome.tokens), "tokenizer": cfg.tokenizer}
    if cfg.dedup:
        report["exact_duplicates"] = _clusters(out, outcome, outcome.exact, cfg.max_examples)
    if near is not None:
        report["near_duplicates"] = {
            "params": {"ngram": cfg.ngram, "ngram_unit": cfg.ngram_unit, "num_perm": cfg.num_perm,
                       "threshold": cfg.threshold, "bands": near.bands, "rows": near.rows},
            "candidate_pairs": near.candidate_pairs, "verified_pairs": near.verified_pairs,
            **_clusters(out, outcome, outcome.near_rep, cfg.max_examples, near.similarity)}
    return report


def _changes(cfg: ProcessConfig, out: Collected) -> dict[str, Any]:
    """Characters (and rows) each cleaning rule changed, over every row that was cleaned (also rows that a
    filter or a dedup step removed afterwards)."""
    enabled = {"unicode": cfg.unicode_form != "none", "spaces": cfg.unicode_form == "safe",
               "control": cfg.strip_control, "whitespace": cfg.normalize_whitespace}
    return {rule: {"enabled": enabled[rule], "chars": out.chars_changed[rule], "rows": out.rows_changed[rule]}
            for rule in CLEAN_RULES}


_RULE_NAMES = {"unicode": "unicode_form {form}", "spaces": "odd spaces to ' ' (with unicode_form safe)",
               "control": "control characters (strip_control)", "whitespace": "whitespace (normalize_whitespace)"}


def _output_names(cfg: ProcessConfig, validation: int) -> list[str]:
    names = ["train.jsonl", *(["validation.jsonl"] if validation else []), "report.json", "report.md", "lengths.png"]
    return names + (["rejected.jsonl"] if cfg.keep_rejected else [])


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Data processing report ({report['kind']} data)", "",
             f"{report['rows_in']} rows in, {report['rows_out']} rows out.", "", "| input | format | rows |",
             "|---|---|---|"]
    lines += [f"| {f['path']} | {f['format']} | {f['rows']} |" for f in report["inputs"]]
    lines += ["", "| step | rows in | removed | rows out |", "|---|---|---|---|"]
    for step in report["steps"]:
        if step["step"] == "split":
            lines.append(f"| split | {step['rows_in']} | train {step['train']}, validation {step['validation']} "
                         f"| {step['rows_out']} |")
            continue
        removed = ", ".join(f"{rule} {n}" for rule, n in step["removed"].items() if n) or "-"
        off = "" if step.get("enabled", True) else " (off)"
        lines.append(f"| {step['step']}{off} | {step['rows_in']} | {removed} | {step['rows_out']} |")
    lines += ["", "## Characters changed by cleaning (every row cleaned)", "", "| rule | characters | rows |",
              "|---|---|---|"]
    form = report["options"]["unicode_form"]
    for rule, n in report["characters_changed"].items():
        counts = f"{n['chars']} | {n['rows']}" if n["enabled"] else "off | -"
        lines.append(f"| {_RULE_NAMES[rule].format(form=form)} | {counts} |")
    for rule, rows in report["rejected_examples"].items():
        lines += ["", f"## First rows removed by `{rule}`", ""]
        lines += [f"- `{r['source']}`: {r['reason']}: {_one_line(r['row'])}" for r in rows]
    for key in ("exact_duplicates", "near_duplicates"):
        if key in report and report[key]["largest"]:
            lines += ["", f"## Largest {key.replace('_', ' ')} clusters ({report[key]['clusters']} in all)", ""]
            for c in report[key]["largest"]:
                lines.append(f"- {c['size']} rows; kept `{c['kept']['source']}`: {_one_line(c['kept']['text'])}")
                lines += [f"  - removed `{m['source']}`" + (f" (Jaccard ~{m['similarity']})" if "similarity" in m
                                                           else "") + f": {_one_line(m['text'])}"
                          for m in c["removed"]]
    lines += ["", "## Lengths of the kept rows", ""]
    for unit, s in report["lengths"].items():
        if s.get("count"):
            lines.append(f"- {unit}: min {s['min']}, mean {s['mean']}, p50 {s['p50']}, p95 {s['p95']}, max {s['max']}")
    lines += ["", "Outputs: " + ", ".join(f"`{p}`" for p in report["outputs"].values()), ""]
    return "\n".join(lines)


def _one_line(text: str, width: int = 100) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def plot_lengths(path: Path, lengths: dict[str, np.ndarray | None]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    panels = [(unit, values) for unit, values in lengths.items() if values is not None and len(values)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4), squeeze=False)
    for ax, (unit, values) in zip(axes[0], panels):
        ax.hist(values, bins=50, color="#4477aa")
        ax.set_xlabel(f"length in {unit}")
        ax.set_ylabel("rows")
        stats = length_stats(list(values))
        ax.set_title(f"{unit}: p50 {stats['p50']}, p95 {stats['p95']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(folder: Path, report: dict[str, Any], lengths: dict[str, np.ndarray | None]) -> None:
    (folder / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2, default=str) + "\n",
                                        encoding="utf-8")
    (folder / "report.md").write_text(markdown(report), encoding="utf-8")
    plot_lengths(folder / "lengths.png", lengths)
