"""What evaluate.py writes: eval_results.json / .md, report.md / .html, a chart per metric, the answers side by
side, and a ready OpenCompass config for the same models."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

Row = tuple[str, str]  # (task, metric)


def table_rows(results: list[dict[str, Any]], names: list[str]) -> list[tuple[Row, dict[str, Any], list[Any]]]:
    """(task, metric), a record of the row (version, direction), the value per model (None where missing)."""
    rows: dict[Row, dict[str, Any]] = {}
    values: dict[tuple[Row, str], float] = {}
    for r in results:
        key = (r["task"], r["metric"] + (f" ({r['filter']})" if r.get("filter") not in (None, "", "none") else ""))
        rows.setdefault(key, r)
        values[(key, r["model"])] = r["value"]
    return [(key, rec, [values.get((key, n)) for n in names]) for key, rec in rows.items()]


def best_index(values: list[Any], higher: bool | None) -> int | None:
    present = [(v, i) for i, v in enumerate(values) if isinstance(v, (int, float))]
    if higher is None or len(present) < 2 or len({v for v, _ in present}) == 1:
        return None
    return (max if higher else min)(present)[1]


def _fmt(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"


def _direction(higher: bool | None) -> str:
    return "↑" if higher else "↓" if higher is False else ""


def markdown_table(results: list[dict[str, Any]], names: list[str]) -> str:
    lines = ["| task | metric | " + " | ".join(names) + " | version |",
             "|---|---|" + "---:|" * len(names) + "---|"]
    for (task, metric), rec, values in table_rows(results, names):
        best = best_index(values, rec["higher_is_better"])
        cells = [f"**{_fmt(v)}**" if i == best else _fmt(v) for i, v in enumerate(values)]
        lines.append(f"| {task} | {metric} {_direction(rec['higher_is_better'])} | " + " | ".join(cells)
                     + f" | {rec.get('version') or ''} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, record: dict[str, Any]) -> None:
    (out / "eval_results.json").write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    names = [m["name"] for m in record["models"]]
    models = "\n".join(f"- **{m['name']}**: `{m['path']}` ({m['kind']}" + (f", base `{m['base']}`" if m.get("base")
                                                                               else "") + ")"
                       for m in record["models"])
    (out / "eval_results.md").write_text(
        f"# Evaluation results\n\n{models}\n\nBold: the best model of the row (↑ higher is better, ↓ lower).\n\n"
        + markdown_table(record["results"], names), encoding="utf-8")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def write_charts(out: Path, results: list[dict[str, Any]], names: list[str]) -> list[tuple[str, str]]:
    """A bar chart PNG per metric (charts/<task>__<metric>.png); (title, relative path) of each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "charts").mkdir()
    charts = []
    for (task, metric), rec, values in table_rows(results, names):
        best = best_index(values, rec["higher_is_better"])
        fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(names) + 2), 3.2))
        heights = [v if isinstance(v, (int, float)) else 0 for v in values]
        bars = ax.bar(range(len(names)), heights, color=["#d62728" if i == best else "#1f77b4"
                                                        for i in range(len(names))])
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=15, ha="right", fontsize=8)
        ax.set_title(f"{task}: {metric} {_direction(rec['higher_is_better'])}", fontsize=10)
        ax.margins(y=0.15)
        fig.tight_layout()
        rel = f"charts/{slug(task)}__{slug(metric)}.png"
        fig.savefig(out / rel, dpi=110)
        plt.close(fig)
        charts.append((f"{task}: {metric}", rel))
    return charts


def write_report(out: Path, record: dict[str, Any]) -> None:
    """report.md and report.html: models, the table (best marked), the charts, the answers side by side."""
    names = [m["name"] for m in record["models"]]
    charts = write_charts(out, record["results"], names)
    answers = record.get("answers", [])
    md = [f"# Model comparison\n\n{len(names)} models: " + ", ".join(f"`{n}`" for n in names),
          "\n## Metrics (bold: best of the row)\n", markdown_table(record["results"], names), "## Charts\n"]
    md += [f"![{title}]({rel})\n" for title, rel in charts]
    if answers:
        md.append("## Answers side by side\n")
        for a in answers:
            md.append(f"### {a['source']}\n\n**question**: {a['question']}\n\n**reference**: {a['reference']}\n")
            md += [f"- **{n}**: {a['answers'][n]}" for n in names]
            md.append("")
    md.append("\nOpenCompass: `opencompass_config.py` in this folder (see its docstring for the command).\n")
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    (out / "report.html").write_text(html_page(record, names, charts), encoding="utf-8")


def html_page(record: dict[str, Any], names: list[str], charts: list[tuple[str, str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(n)}</th>" for n in names)
    rows = []
    for (task, metric), rec, values in table_rows(record["results"], names):
        best = best_index(values, rec["higher_is_better"])
        cells = "".join(f"<td class='{'best' if i == best else ''}'>{_fmt(v)}</td>" for i, v in enumerate(values))
        rows.append(f"<tr><td>{e(task)}</td><td>{e(metric)} {_direction(rec['higher_is_better'])}</td>{cells}"
                    f"<td class='v'>{e(str(rec.get('version') or ''))}</td></tr>")
    figs = "".join(f"<figure><img src='{e(rel)}' alt='{e(t)}'><figcaption>{e(t)}</figcaption></figure>"
                   for t, rel in charts)
    side = "".join(
        f"<tr><td><div class='src'>{e(a['source'])}</div>{e(a['question'])}</td><td>{e(a['reference'])}</td>"
        + "".join(f"<td>{e(a['answers'][n])}</td>" for n in names) + "</tr>" for a in record.get("answers", []))
    models = "".join(f"<li><b>{e(m['name'])}</b>: <code>{e(m['path'])}</code> ({e(m['kind'])})</li>"
                     for m in record["models"])
    answers = (f"<h2>Answers side by side</h2><table><tr><th>question</th><th>reference</th>{head}</tr>{side}"
               "</table>") if side else ""
    return f"""<!doctype html><html lang="zh"><head><meta charset="utf-8"><title>Model comparison</title><style>
body{{font-family:system-ui,"PingFang SC","Noto Sans CJK SC",sans-serif;margin:2em auto;max-width:1200px;color:#222}}
table{{border-collapse:collapse;margin:1em 0;width:100%}}td,th{{border:1px solid #ddd;padding:6px 10px;
vertical-align:top}}th{{background:#f4f6f8}}td.best{{background:#e6f4ea;font-weight:bold}}
td.v,.src{{color:#888;font-size:85%}}figure{{display:inline-block;margin:0 1em 1em 0}}img{{max-width:520px}}
</style></head><body><h1>Model comparison</h1><ul>{models}</ul><h2>Metrics</h2>
<p>Green: the best model of the row (↑ higher is better, ↓ lower).</p>
<table><tr><th>task</th><th>metric</th>{head}<th>version</th></tr>{"".join(rows)}</table>
<h2>Charts</h2>{figs}{answers}</body></html>
"""


def meta_template(tokenizer: Any) -> dict[str, Any] | None:
    """OpenCompass's meta template from the tokenizer's chat template: the text around a user and a bot turn, and
    what comes once before the first round (a default system prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    u, b, u2 = "\x00USER\x00", "\x00BOT\x00", "\x00USER2\x00"

    def render(turns: list[str], generation: bool) -> str:
        roles = ["user", "assistant"] * 2
        return tokenizer.apply_chat_template([{"role": r, "content": t} for r, t in zip(roles, turns)],
                                             add_generation_prompt=generation, tokenize=False)

    prompt, user_only, two, full = render([u], True), render([u], False), render([u, b, u2], True), render([u, b],
                                                                                                          False)
    user_end = user_only[user_only.index(u) + len(u):]
    bot_begin = prompt[prompt.index(u) + len(u) + len(user_end):]
    bot_end = full[full.index(b) + len(b):]
    between = two[two.index(b) + len(b):two.index(u2)]  # bot end + the next user's begin
    user_begin = between[len(bot_end):] if between.startswith(bot_end) else between
    first_begin = prompt[:prompt.index(u)]
    begin = first_begin[:len(first_begin) - len(user_begin)] if first_begin.endswith(user_begin) else ""
    return {"begin": begin, "round": [{"role": "HUMAN", "begin": user_begin, "end": user_end},
                                      {"role": "BOT", "begin": bot_begin, "end": bot_end, "generate": True}]}


OPENCOMPASS_HEAD = '''"""OpenCompass config for the models of this report (written by self_model/tools/evaluate.py).

OpenCompass is not installed with this project: opencompass 0.4.2 depends on pyext 0.7, which does not build on
Python 3.11 (it calls inspect.getargspec), and it pins its own datasets / transformers ranges. Run it in its own
Python 3.10 environment, from this folder:

    uv venv -p 3.10 .oc && . .oc/bin/activate && uv pip install opencompass peft
    opencompass opencompass_config.py -w outputs/opencompass

An adapter is loaded onto its base through `peft_path` (no merged copy). The meta templates are the text around
a user and an assistant turn of each model's own chat template. Swap the datasets for any of
opencompass.configs.datasets (e.g. ceval, mmlu, gsm8k).
"""
from mmengine.config import read_base
from opencompass.models import HuggingFaceCausalLM

with read_base():
    from opencompass.configs.datasets.cmmlu.cmmlu_ppl import cmmlu_datasets

datasets = [*cmmlu_datasets]
'''


def opencompass_config(models: list[dict[str, Any]]) -> str:
    entries = []
    for m in models:
        path, peft = (m["base"], m["path"]) if m["kind"] == "adapter" else (m["path"], None)
        entries.append(
            f"    dict(type=HuggingFaceCausalLM, abbr={m['name']!r}, path={path!r}, tokenizer_path={m['path']!r},\n"
            f"         peft_path={peft!r}, meta_template={m.get('meta_template')!r},\n"
            "         tokenizer_kwargs=dict(padding_side='left', truncation_side='left', trust_remote_code=True),\n"
            "         model_kwargs=dict(device_map='auto', trust_remote_code=True),\n"
            "         max_out_len=256, max_seq_len=2048, batch_size=8, run_cfg=dict(num_gpus=1)),")
    return OPENCOMPASS_HEAD + "\nmodels = [\n" + "\n".join(entries) + "\n]\n"
