"""The whole pipeline from one command (self_model/pipeline.py + config/self_model_config/pipeline.yaml).

The slow test runs the shipped pipeline.yaml end to end on the embedded tiny model, as a user types it, and checks
from the files the run writes that the demo model learns: CPT perplexity at least 3x lower than the random model's,
SFT eval loss at least 30% below its first evaluation, DPO eval reward accuracy >= 0.8, GRPO eval reward higher after
than before, answers in Chinese about the question's disease; then the same command again skips every stage.
The fast tests feed it bad input: unknown stage names and kinds, a stage whose input the stage before does not make,
a failing stage (it stops, says how to resume, keeps what finished; the rerun skips it), and --dry-run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT

from self_model import pipeline
from self_model.core.config import load_config
from self_model.core.errors import ConfigError, UserError
from self_model.tools.pipeline_config import PipelineConfig
from self_model.tools.pipeline_run import plan, run_pipeline

SHIPPED = ROOT / "config" / "self_model_config" / "pipeline.yaml"
DEMO = ROOT / "data_process" / "sample_data" / "demo"
HAN = re.compile(r"[\u4e00-\u9fff]")


def write_pipeline(tmp_path: Path, stages: list[dict[str, Any]], base: str | Path) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"base_model": str(base), "output_dir": str(tmp_path / "out"), "stages": stages},
                                   allow_unicode=True), encoding="utf-8")
    return path


def data_stage(name: str, source: Path) -> dict[str, Any]:
    return {"name": name, "kind": "process_data", "config": "config/data_config/process.yaml",
            "overrides": {"input": [str(source)], "format": "text", "val_ratio": 0.0, "num_proc": 1}}


def shipped_stages() -> list[dict[str, Any]]:
    return yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))["stages"]


# ---- the whole pipeline, end to end ----------------------------------------------------------------------------

@pytest.mark.slow
def test_the_shipped_pipeline_runs_end_to_end_and_the_demo_model_learns(tiny_model_dir: Path,
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "pipeline"
    command = [sys.executable, "self_model/pipeline.py", "--config", "config/self_model_config/pipeline.yaml",
               f"base_model={tiny_model_dir}", f"output_dir={out}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    summary = json.loads((out / "pipeline_summary.json").read_text(encoding="utf-8"))
    rows = {r["name"]: r for r in summary["stages"]}
    assert [r["status"] for r in summary["stages"]] == ["ran"] * len(shipped_stages())
    assert "| stage | kind | time | metric | before → after |" in done.stdout  # the table is printed

    # CPT: held-out perplexity of the random (grown) model vs after, from the run's own eval_results.json.
    evals = json.loads((out / "cpt" / "final" / "eval_results.json").read_text(encoding="utf-8"))
    assert evals[0]["step"] == 0 and evals[0]["eval_perplexity"] >= 3 * evals[-1]["eval_perplexity"], evals
    assert rows["cpt"]["before"] == evals[0]["eval_perplexity"]
    # SFT: eval loss at least 30% below its first evaluation (before any step), from metrics.jsonl.
    sft = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    losses = [r["eval_loss"] for r in sft if "eval_loss" in r]
    assert losses[-1] <= 0.7 * losses[0], losses
    # DPO: eval reward accuracy at the end.
    dpo = [json.loads(line) for line in (out / "dpo" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    accuracies = [r["eval_rewards/accuracies"] for r in dpo if "eval_rewards/accuracies" in r]
    assert accuracies[-1] >= 0.8, accuracies
    # GRPO: the eval prompts' mean reward after training above the one before.
    grpo = json.loads((out / "grpo" / "final" / "data_report.json").read_text(encoding="utf-8"))
    assert grpo["eval_after"]["eval_reward"] > grpo["eval_before"]["eval_reward"], grpo
    # Merge and quantize: a checked merge, an int8 export; the comparison report covers base and every stage.
    assert json.loads((out / "merge" / "export_report.json").read_text(encoding="utf-8"))["check"]["passed"]
    assert json.loads((out / "quantize" / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    results = json.loads((out / "eval" / "eval_results.json").read_text(encoding="utf-8"))
    compared = {r["model"] for r in results["results"]}
    assert {"base", "cpt", "sft", "dpo", "grpo", "merge", "quantize"} <= compared, compared
    assert summary["report"] == str(out / "eval" / "report.md") and Path(summary["report"]).is_file()
    assert summary["report"] in done.stdout
    # The answers: non-empty Chinese, naming the disease asked about and one of its symptoms from the demo table.
    knowledge = json.loads((DEMO / "knowledge.json").read_text(encoding="utf-8"))
    assert summary["answers"]
    for qa in summary["answers"]:
        disease = max((d for d in knowledge if d in qa["question"]), key=len)
        assert HAN.search(qa["answer"]) and disease in qa["answer"], qa
        assert f"A: {qa['answer']}" in done.stdout

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / "pipeline_summary.json").read_text(encoding="utf-8"))
    assert {r["status"] for r in summary["stages"]} == {"finished earlier"}
    assert again.stdout.count("finished earlier, skipped") == len(shipped_stages())


# ---- bad input ----------------------------------------------------------------------------------------------------

def test_dry_run_checks_every_stage_of_the_shipped_pipeline_and_shows_the_wiring(tiny_model_dir: Path,
                                                                                tmp_path: Path,
                                                                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code = pipeline.cli(["--config", str(SHIPPED), "--dry-run", f"base_model={tiny_model_dir}", f"output_dir={out}"])
    printed = capsys.readouterr().out
    assert code == 0 and not out.exists()  # nothing ran, nothing was written
    assert "every stage's config is valid" in printed
    assert f"model_name_or_path = {out / 'sft' / 'final'}  (wired)" in printed  # DPO starts from SFT's result
    assert f"data.train_file = ['{out / 'data' / 'train.jsonl'}']  (wired)" in printed  # CPT reads the clean corpus


def test_dry_run_reports_every_bad_key_of_every_stage_at_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    stages = shipped_stages()
    stages[2]["overrides"]["training_args.learning_rat"] = 1.0e-3  # cpt
    stages[5]["overrides"]["ppo.rollout"] = 4  # grpo
    cfg = load_config(PipelineConfig, write_pipeline(tmp_path, stages, tiny_model_dir))
    with pytest.raises(ConfigError) as err:
        run_pipeline(cfg, "pipeline.yaml", dry_run=True)
    text = str(err.value)
    assert "stage 'cpt'" in text and "learning_rat" in text and "learning_rate" in text
    assert "stage 'grpo'" in text and "ppo.rollout" in text and "rollout_n" in text
    assert not (tmp_path / "out").exists()


def test_unknown_stage_names_and_kinds_say_what_was_meant(tiny_model_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    config = write_pipeline(tmp_path, shipped_stages(), tiny_model_dir)
    assert pipeline.cli(["--config", str(config), "--from", "stf", "--dry-run"]) != 0
    assert "--from stf: no stage of that name (did you mean 'sft'?)" in capsys.readouterr().err
    assert pipeline.cli(["--config", str(config), "--only", "evl", "--dry-run"]) != 0
    assert "(did you mean 'eval'?)" in capsys.readouterr().err

    stages = shipped_stages()
    stages[3]["kind"] = "finetun"
    with pytest.raises(ConfigError, match=r"stages\[3\]\.kind: unknown stage kind 'finetun' \(did you mean "
                                          r"'finetune'"):
        load_config(PipelineConfig, write_pipeline(tmp_path, stages, tiny_model_dir))


def test_a_stage_whose_input_the_stage_before_does_not_make_is_refused_before_anything_runs(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    by_name = {s["name"]: s for s in shipped_stages()}
    # Training after the quantizing export; a vocabulary extension on a LoRA adapter.
    stages = [by_name["quantize"], by_name["sft"], by_name["dpo"], by_name["vocab"]]
    cfg = load_config(PipelineConfig, write_pipeline(tmp_path, stages, tiny_model_dir))
    with pytest.raises(ConfigError) as err:
        run_pipeline(cfg, "pipeline.yaml", dry_run=True)
    text = str(err.value)
    assert "stage 'sft' (finetune) needs a model it can train at full precision, but stage 'quantize' leaves a " \
           "quantized model" in text
    assert "stage 'vocab' (vocab) needs full weights" in text and "stage 'dpo' leaves a LoRA adapter" in text
    assert "put an export stage" in text
    assert not (tmp_path / "out").exists()


def test_only_a_stage_whose_inputs_have_not_been_made_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(PipelineConfig, write_pipeline(tmp_path, shipped_stages(), tiny_model_dir))
    with pytest.raises(UserError, match=r"--only dpo: stage 'dpo' reads what stage\(s\) \['sft'\] make, and they "
                                        r"have not finished; run from 'sft' \(--from sft\)"):
        run_pipeline(cfg, "pipeline.yaml", only="dpo")


def test_a_failing_stage_stops_the_pipeline_keeps_what_finished_and_the_rerun_resumes(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good, bad = tmp_path / "good.txt", tmp_path / "more.jsonl"
    good.write_text("感冒的常见症状有鼻塞、流涕、咽痛。\n胃炎患者应注意规律饮食、少吃辛辣。\n", encoding="utf-8")
    bad.write_text('{"text": "得了感冒一般到呼吸内科就诊。"}\n{"text": "broken\n', encoding="utf-8")
    config = write_pipeline(tmp_path, [data_stage("clean", good), data_stage("more", bad), data_stage("last", good)],
                            tiny_model_dir)
    out = tmp_path / "out"

    assert pipeline.cli(["--config", str(config)]) != 0
    err = capsys.readouterr().err
    assert "the pipeline stopped at stage 'more' (process_data)" in err
    assert f"{bad}:2" in err  # the stage's own error, with the file and line
    assert "finished stages, kept in" in err and "['clean']" in err
    assert f"uv run python self_model/pipeline.py --config {config}" in err and "--from more" in err
    assert (out / "clean" / "train.jsonl").is_file() and not (out / "last").exists()
    summary = json.loads((out / "pipeline_summary.json").read_text(encoding="utf-8"))
    assert [r["status"] for r in summary["stages"]] == ["ran", "failed", "not run"]

    bad.write_text('{"text": "得了感冒一般到呼吸内科就诊。"}\n', encoding="utf-8")  # the fix
    first_result = (out / "clean" / "train.jsonl").stat().st_mtime_ns
    assert pipeline.cli(["--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "stage 'clean' (process_data): finished earlier, skipped" in printed
    assert (out / "clean" / "train.jsonl").stat().st_mtime_ns == first_result  # not redone
    summary = json.loads((out / "pipeline_summary.json").read_text(encoding="utf-8"))
    assert [r["status"] for r in summary["stages"]] == ["finished earlier", "ran", "ran"]
    assert summary["stages"][1]["metric"] == "rows kept" and summary["stages"][1]["after"] == 1

    # --only redoes one stage; --from redoes a stage and the ones after it.
    assert pipeline.cli(["--config", str(config), "--only", "clean"]) == 0
    assert (out / "clean" / "train.jsonl").stat().st_mtime_ns != first_result
    printed = capsys.readouterr().out
    assert f"removing the earlier result of stage 'clean': {out / 'clean'}" in printed
    assert "stage 'more'" not in printed
    assert pipeline.cli(["--config", str(config), "--from", "more"]) == 0
    summary = json.loads((out / "pipeline_summary.json").read_text(encoding="utf-8"))
    assert [r["status"] for r in summary["stages"]] == ["finished earlier", "ran", "ran"]


def test_a_finished_stage_is_not_checked_again_and_its_result_is_the_next_start(tiny_model_dir: Path,
                                                                              tmp_path: Path) -> None:
    """An export's own check refuses an existing output_dir: a rerun must not load a finished export's config, and
    --only must check the stage as if its folder were gone (it is removed before the stage runs)."""
    by_name = {s["name"]: s for s in shipped_stages()}
    cfg = load_config(PipelineConfig, write_pipeline(tmp_path, [by_name["merge"], by_name["chat"]], tiny_model_dir))
    merge = tmp_path / "out" / "merge"
    merge.mkdir(parents=True)
    (merge / "config.json").write_text("{}", encoding="utf-8")
    (merge / "export_report.json").write_text("{}", encoding="utf-8")
    steps = plan(cfg)
    assert steps[0].cfg is None and steps[1].wired["model_name_or_path"] == str(merge)
    assert plan(cfg, frozenset({"merge"}))[0].cfg.output_dir == str(merge) + ".redo"
