"""evaluate.py on tiny models: the local lm-eval task, perplexity of a CPT run vs its base, a base vs SFT-adapter
comparison report, and the bad inputs (each refused before a report folder appears).

The models are test_inference.py's: an "export" (full weights, a chat template, an untied random LM head so greedy
answers are varied) and a real SFT run's final/ (a LoRA adapter on it, evaluated without merging on disk).
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, SAMPLE_DIR
from test_inference import export_dir, run_final  # noqa: F401 - module fixtures shared with the inference tests

from self_model.core.cli import run_main
from self_model.core.config import load_config
from self_model.core.errors import UserError
from self_model.tools import evaluate
from self_model.tools.evaluate_config import EvalConfig

CONFIG = ROOT / "config" / "self_model_config" / "eval.yaml"
QUESTIONS = ROOT / "data_process" / "sample_data" / "eval" / "medical_qa.jsonl"
HELD_OUT = SAMPLE_DIR / "pretrain_eval.txt"
NOTHING = ["harness.tasks=[]", "perplexity.files=[]", "generation.question_file=null"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """The tiny model gains nothing from a second thread (see test_inference.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(models: list[Path | str], out: Path, *overrides: str) -> EvalConfig:
    return load_config(EvalConfig, CONFIG, [f"models={json.dumps([str(m) for m in models])}",
                                            f"output_dir={out}", *overrides])


def results(out: Path) -> dict[str, dict[tuple[str, str], float]]:
    """model name → (task, metric) → value."""
    table: dict[str, dict[tuple[str, str], float]] = {}
    for r in json.loads((out / "eval_results.json").read_text(encoding="utf-8"))["results"]:
        table.setdefault(r["model"], {})[(r["task"], r["metric"])] = r["value"]
    return table


def test_shipped_config_dry_run(capsys: Any) -> None:
    assert evaluate.main(load_config(EvalConfig, CONFIG), dry_run=True) is None
    out = capsys.readouterr().out
    assert "cmedqa_mc" in out and "20 texts" in out and "8 questions" in out


def test_run_by_path_does_not_shadow_hf_evaluate(capsys: Any, monkeypatch: Any) -> None:
    """`python self_model/tools/evaluate.py` puts self_model/tools first on sys.path, where `import evaluate` (what
    lm-eval's tasks do) would find the script instead of Hugging Face's package."""
    import importlib.util
    import runpy
    import sys

    script = ROOT / "self_model" / "tools" / "evaluate.py"
    monkeypatch.setattr(sys, "path", [str(script.parent), *sys.path])
    monkeypatch.setattr(sys, "argv", [str(script), "--config", str(CONFIG), "--dry-run"])
    runpy.run_path(str(script), run_name="__main__")
    assert "dry run" in capsys.readouterr().out
    spec = importlib.util.find_spec("evaluate")
    assert spec is None or Path(spec.origin or "").parent != script.parent


def test_local_lm_eval_task_returns_an_accuracy(export_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: uv sync --extra eval")
    out = evaluate.main(config([export_dir], tmp_path / "mc", *NOTHING, "harness.tasks=[cmedqa_mc]"))
    record = json.loads((out / "eval_results.json").read_text(encoding="utf-8"))
    acc = [r for r in record["results"] if r["metric"] == "acc"]
    assert len(acc) == 1 and 0.0 <= acc[0]["value"] <= 1.0
    assert acc[0]["samples"] == 12 and acc[0]["version"] == 1.0 and acc[0]["model"] == "export0/tiny_chat"
    assert "settings" in acc[0] and acc[0]["stderr"] is not None


def test_cpt_perplexity_is_below_its_base(pretrain_config: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    from self_model.pretrain import train_pretrain

    final = train_pretrain.main(pretrain_config({"training_args.max_steps": "6", "training_args.learning_rate":
                                                 "3.0e-3", "training_args.save_steps": "6",
                                                 "training_args.eval_steps": "6"}))
    out = evaluate.main(config([tiny_model_dir, final], tmp_path / "ppl", *NOTHING, f"perplexity.files=[{HELD_OUT}]",
                               "names=[base, cpt]"))
    table = results(out)
    base, cpt = table["base"][("perplexity", "perplexity")], table["cpt"][("perplexity", "perplexity")]
    assert math.isfinite(base) and cpt < base
    assert f"**{cpt:.4g}**" in (out / "eval_results.md").read_text(encoding="utf-8")  # lower is better: marked


def test_base_vs_adapter_comparison_report(export_dir: Path, run_final: Path, tmp_path: Path,  # noqa: F811
                                           capsys: Any) -> None:
    tasks = "harness.tasks=[cmedqa_mc]" if _has_lm_eval() else "harness.tasks=[]"  # lm-eval's own test skips
    argv = ["--config", str(CONFIG), f"models=[{export_dir}, {run_final}]", "names=[base, sft]",
            f"output_dir={tmp_path / 'cmp'}", tasks, f"perplexity.files=[{HELD_OUT}]",
            "generation.settings.max_new_tokens=24", "generation.side_by_side=3"]
    run_main(evaluate.main, EvalConfig, evaluate.__doc__, argv)
    out = tmp_path / "cmp"
    print(capsys.readouterr().out)  # the table, for the closing note
    table = results(out)
    assert set(table) == {"base", "sft"}
    for name in ("base", "sft"):
        assert {("generation", "rougeL_char"), ("generation", "bleu_zh"), ("generation", "refusal_rate"),
                ("perplexity", "perplexity")} <= set(table[name])
    record = json.loads((out / "eval_results.json").read_text(encoding="utf-8"))
    assert [m["kind"] for m in record["models"]] == ["full", "adapter"]
    assert record["models"][1]["base"] == str(export_dir)
    assert len(record["answers"]) == 3 and all(set(a["answers"]) == {"base", "sft"} for a in record["answers"])
    answers = [a["answers"][n] for a in record["answers"] for n in ("base", "sft")]
    assert any(answers) and len(set(answers)) > 1  # real, varied greedy answers
    md, page = (out / "report.md").read_text(encoding="utf-8"), (out / "report.html").read_text(encoding="utf-8")
    assert "| base | sft |" in md and "<th>base</th><th>sft</th>" in page and "class='best'" in page
    assert record["answers"][0]["question"] in page and record["answers"][0]["reference"] in md
    charts = sorted(p.name for p in (out / "charts").glob("*.png"))
    assert "perplexity__perplexity.png" in charts and "generation__rougeL_char.png" in charts
    assert all(f"charts/{c}" in page for c in charts)
    oc = (out / "opencompass_config.py").read_text(encoding="utf-8")
    ast.parse(oc)
    assert f"peft_path={str(run_final)!r}" in oc and "<|im_start|>assistant\\n" in oc
    assert not (tmp_path / "cmp.tmp").exists()


def _has_lm_eval() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


# ---- bad input --------------------------------------------------------------------------------------------------
def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_unknown_task_names_lm_evals_closest(export_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: uv sync --extra eval")
    with pytest.raises(UserError, match=r"unknown lm-eval task 'cmedqa_mcc'.*did you mean.*cmedqa_mc"):
        evaluate.main(config([export_dir], tmp_path / "r", *NOTHING, "harness.tasks=[cmedqa_mcc]"))
    with pytest.raises(UserError, match=r"unknown lm-eval task 'hellaswa'.*hellaswag"):
        evaluate.main(config([export_dir], tmp_path / "r", *NOTHING, "harness.tasks=[hellaswa]"))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("rows, message", [
    ("", r"empty"),
    ('{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}\n{"conversations": [\n',
     r"q\.jsonl:2"),
    ('{"conversations": [{"from": "human", "value": "发烧怎么办？"}]}\n', r"no reference answer.*q\.jsonl:1"),
])
def test_bad_question_files(export_dir: Path, tmp_path: Path, rows: str, message: str) -> None:  # noqa: F811
    questions = write(tmp_path / "q.jsonl", rows)
    with pytest.raises(UserError, match=message):
        evaluate.main(config([export_dir], tmp_path / "r", *NOTHING, f"generation.question_file={questions}"))
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.tmp").exists()


def test_models_that_do_not_load(export_dir: Path, tmp_path: Path, capsys: Any) -> None:  # noqa: F811
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    write(not_a_model / "README.md", "not weights")
    with pytest.raises(UserError, match="not a model folder"):
        evaluate.main(config([export_dir, not_a_model], tmp_path / "r", *NOTHING, f"perplexity.files=[{HELD_OUT}]"))
    broken = tmp_path / "broken"  # a config and a tokenizer, no weights: fails after the first model was evaluated
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((export_dir / name).read_bytes())
    with pytest.raises(UserError, match="cannot load the model"):
        evaluate.main(config([export_dir, broken], tmp_path / "r", *NOTHING, f"perplexity.files=[{HELD_OUT}]"))
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.tmp").exists()
    with pytest.raises(SystemExit) as exc:  # the command line: a message, no traceback, a non-zero exit
        run_main(evaluate.main, EvalConfig, "", ["--config", str(CONFIG), f"models=[{not_a_model}]", *NOTHING,
                                                 f"perplexity.files=[{HELD_OUT}]", f"output_dir={tmp_path / 'r'}"])
    assert exc.value.code != 0 and "not a model folder" in capsys.readouterr().err


def test_config_mistakes_all_at_once(tmp_path: Path) -> None:
    from self_model.core.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        config([tmp_path / "missing_model"], tmp_path / "r", *NOTHING, "names=[a, b]", "harness.taks=[x]")
    text = str(exc.value)
    assert "no such folder" in text and "did you mean 'tasks'" in text
