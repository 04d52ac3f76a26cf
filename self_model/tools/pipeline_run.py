"""Plan, check and run a pipeline (pipeline.yaml), then write and print its summary.

Planning walks the stages in order: each stage's YAML gets the keys wired from what the stages before it make
(`pipeline_stages.py`), then its `overrides:`, and is loaded by the stage script's own dataclass. Every stage is
checked this way before anything runs (a start that does not exist yet is checked with the chain's base model in its
place), and every problem of every stage is reported at once. A stage whose finished marker is present is skipped, so
running the same command again resumes after the last finished stage.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from self_model.core.config import did_you_mean, load_config
from self_model.core.errors import ConfigError, UserError
from self_model.tools.pipeline_config import PipelineConfig, StageEntry
from self_model.tools.pipeline_stages import KINDS, Kind, Produced, after, refuse_start

logger = logging.getLogger("self_model")
SUMMARY = "pipeline_summary.json"
# Keys holding a stage's inputs (wired from earlier stages): before those stages ran, they are checked with a
# stand-in (the base model, the raw corpus) so the rest of the stage's config can be validated now.
INPUT_KEYS = {"model_name_or_path": "model", "base_model": "model", "base_tokenizer": "model", "models": "model",
              "corpus.train_file": "corpus", "data.train_file": "corpus"}


class PipelineStopped(UserError):
    """A stage failed: the message names it, says what finished and how to go on."""


@dataclass
class Step:
    entry: StageEntry
    kind: Kind
    out: Path
    wired: dict[str, Any]  # the keys the pipeline sets for this stage
    needs: list[str]  # the stages whose outputs this one reads
    cfg: Any = None


def as_overrides(keys: dict[str, Any]) -> list[str]:
    """dotted.key=value strings for the strict loader (values as JSON, which YAML reads back unchanged)."""
    return [f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in keys.items()]


def load_stage(step: Step, wired: dict[str, Any]) -> Any:
    path = step.entry.config
    data = None if path else {}
    return load_config(step.kind.load_class(), path, as_overrides(wired) + as_overrides(step.entry.overrides),
                       data=data)


def stand_in(wired: dict[str, Any], base: str, raw_corpus: list[str] | None) -> dict[str, Any]:
    """The wired keys with every input that does not exist yet replaced by what it will be like."""

    def swap(value: Any, what: str) -> Any:
        if what == "corpus":  # the cleaned corpus stands for the raw one it is made from
            paths = value if isinstance(value, list) else [value]
            return value if all(Path(v).exists() for v in paths) or not raw_corpus else raw_corpus
        if isinstance(value, list):
            return [swap(v, what) for v in value]
        return value if not isinstance(value, str) or Path(value).exists() else base

    return {k: swap(v, INPUT_KEYS[k]) if k in INPUT_KEYS else v for k, v in wired.items()}


def reads(wired: dict[str, Any], earlier: list[Step]) -> list[str]:
    """The earlier stages whose outputs these wired inputs are."""
    inputs = [str(v) for k, value in wired.items() if k in INPUT_KEYS
              for v in (value if isinstance(value, list) else [value])]
    return [s.entry.name for s in earlier if any(Path(v).is_relative_to(s.out) for v in inputs)]


def plan(cfg: PipelineConfig, redo: frozenset[str] = frozenset()) -> list[Step]:
    """Every stage's wiring and loaded config, checked; one ConfigError with every problem of every stage. A stage
    that finished earlier (and is not in `redo`) is not checked again: it will not run."""
    produced = Produced(model=cfg.base_model, models=[("base", cfg.base_model)])
    steps, problems, raw_corpus = [], [], None
    for entry in cfg.stages:
        kind, out = KINDS[entry.kind], cfg.stage_dir(entry.name)
        wired = kind.wire(produced, out)
        step = Step(entry, kind, out, wired, reads(wired, steps))
        steps.append(step)
        if kind.is_done(out) and entry.name not in redo:
            produced = after(kind, entry.name, out, None, produced)
            continue
        where = f"stage '{entry.name}' ({entry.kind}{', ' + entry.config if entry.config else ''})"
        if (refusal := refuse_start(kind, entry.name, produced)) is not None:
            problems.append(refusal)
        checked = stand_in(step.wired, cfg.base_model, raw_corpus)
        if entry.name in redo:  # its folder goes before it runs: check the config as if it were gone already
            checked = {k: str(out) + ".redo" if v == str(out) else v for k, v in checked.items()}
        try:
            step.cfg = load_stage(step, checked)
        except ConfigError as exc:
            problems += [f"{where}: {p}" for p in exc.problems]
        if step.cfg is None:
            continue
        if kind.name == "process_data":
            raw_corpus = step.cfg.inputs
        produced = after(kind, entry.name, out, step.cfg, produced)
    if problems:
        raise ConfigError(problems, source="the pipeline's stages")
    return steps


def select(cfg: PipelineConfig, start: str | None, only: str | None) -> tuple[int, int]:
    """The stages to run, [first, last): everything, from a stage on (--from), or one stage (--only)."""
    names = cfg.stage_names()
    for flag, name in (("--from", start), ("--only", only)):
        if name is not None and name not in names:
            raise UserError(f"{flag} {name}: no stage of that name{did_you_mean(name, names)}; the stages are "
                            f"{names}")
    if start and only:
        raise UserError("--from and --only: give one of them")
    if only:
        return names.index(only), names.index(only) + 1
    return (names.index(start) if start else 0), len(names)


def previous_summary(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    path = Path(cfg.output_dir) / SUMMARY
    if not path.is_file():
        return {}
    return {row["name"]: row for row in json.loads(path.read_text(encoding="utf-8")).get("stages", [])}


def row(step: Step, status: str, seconds: float | None) -> dict[str, Any]:
    metric = None
    if step.kind.is_done(step.out):
        try:
            metric = step.kind.metric(step.out)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:  # a summary gap, not a failed stage
            logger.warning("stage '%s': could not read its metric: %r", step.entry.name, exc)
    return {"name": step.entry.name, "kind": step.kind.name, "status": status, "seconds": seconds,
            "output": str(step.out), "metric": metric.name if metric else None,
            "before": metric.before if metric else None, "after": metric.after if metric else None,
            "source": metric.source if metric else None}


def run_pipeline(cfg: PipelineConfig, config_path: str, start: str | None = None, only: str | None = None,
                 dry_run: bool = False) -> dict[str, Any]:
    first, last = select(cfg, start, only)
    steps = plan(cfg, frozenset(cfg.stage_names()[first:last]) if start or only else frozenset())
    selected = steps[first:last]
    # What the first selected stage reads must already be there: the stages before it are not run.
    not_run = {s.entry.name: s for s in steps[:first]}
    for step in selected:
        unfinished = [n for n in step.needs if n in not_run and not not_run[n].kind.is_done(not_run[n].out)]
        if unfinished:
            flag = f"--only {only}" if only else f"--from {start}"
            raise UserError(f"{flag}: stage '{step.entry.name}' reads what stage(s) {unfinished} make, and they "
                            f"have not finished; run from '{unfinished[0]}' (--from {unfinished[0]}) or without "
                            f"{flag}")
    if dry_run:
        print_plan(steps, first, last)
        return {}
    if start or only:  # redo the selected stages: their earlier results go
        for step in selected:
            if step.out.exists():
                print(f"removing the earlier result of stage '{step.entry.name}': {step.out}")
                shutil.rmtree(step.out)
    earlier = previous_summary(cfg)
    rows = [row(s, "finished earlier" if s.kind.is_done(s.out) else "not run",
                earlier.get(s.entry.name, {}).get("seconds")) for s in steps]
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    for i in range(first, last):
        step = steps[i]
        if step.kind.is_done(step.out):
            print(f"\n=== stage '{step.entry.name}' ({step.kind.name}): finished earlier, skipped ({step.out})")
            continue
        print(f"\n=== stage '{step.entry.name}' ({step.kind.name}) -> {step.out}")
        t0 = time.monotonic()
        try:
            step.cfg = load_stage(step, step.wired)  # now with the real outputs of the stages before
            step.kind.run(step.cfg)
            if not step.kind.is_done(step.out):
                raise UserError(f"the stage returned without writing {step.out / step.kind.done_file}")
        except Exception as exc:  # noqa: BLE001 - any failure stops the pipeline with the way to go on
            if not isinstance(exc, UserError):
                logger.exception("stage '%s' failed", step.entry.name)
            rows[i] = row(step, "failed", round(time.monotonic() - t0, 1))
            write_summary(cfg, config_path, rows, steps)
            raise PipelineStopped(stopped_message(cfg, config_path, steps, i, exc)) from exc
        rows[i] = row(step, "ran", round(time.monotonic() - t0, 1))
        write_summary(cfg, config_path, rows, steps)
    summary = write_summary(cfg, config_path, rows, steps, round(time.monotonic() - began, 1))
    print_summary(summary)
    return summary


def stopped_message(cfg: PipelineConfig, config_path: str, steps: list[Step], failed: int, exc: Exception) -> str:
    step = steps[failed]
    kept = [s.entry.name for s in steps if s.kind.is_done(s.out)]
    cause = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc} (traceback above)"
    command = f"uv run python self_model/pipeline.py --config {config_path}"
    return (f"the pipeline stopped at stage '{step.entry.name}' ({step.kind.name}):\n{cause}\n\n"
            f"finished stages, kept in {cfg.output_dir}: {kept or 'none'}\n"
            f"fix the cause, then run the same command again: finished stages are skipped and '{step.entry.name}' "
            f"starts over:\n  {command}\n(or redo it and everything after it: {command} --from {step.entry.name})")


def report_path(steps: list[Step]) -> str | None:
    for step in reversed(steps):
        if step.kind.name == "evaluate" and step.kind.is_done(step.out):
            return str(step.out / "report.md")
    return None


def answers(steps: list[Step]) -> list[dict[str, str]]:
    for step in reversed(steps):
        if step.kind.name == "chat" and step.kind.is_done(step.out):
            return json.loads((step.out / "answers.json").read_text(encoding="utf-8"))
    return []


def write_summary(cfg: PipelineConfig, config_path: str, rows: list[dict[str, Any]], steps: list[Step],
                  seconds: float | None = None) -> dict[str, Any]:
    summary = {"config": config_path, "output_dir": cfg.output_dir, "base_model": cfg.base_model,
               "seconds_this_run": seconds, "stages": rows, "report": report_path(steps), "answers": answers(steps)}
    out = Path(cfg.output_dir)
    tmp = out / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.rename(out / SUMMARY)
    (out / "pipeline_summary.md").write_text(summary_table(summary) + "\n", encoding="utf-8")
    return summary


def shown(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value).replace("\n", " ").replace("|", "/")
    return text if len(text) <= 40 else text[:39] + "…"


def summary_table(summary: dict[str, Any]) -> str:
    lines = ["| stage | kind | time | metric | before → after |", "|---|---|---:|---|---|"]
    for r in summary["stages"]:
        time_s = f"{r['seconds']:.0f} s" if r.get("seconds") is not None else "—"
        if r["status"] not in ("ran", "finished earlier"):
            time_s += f" ({r['status']})"
        change = f"{shown(r['before'])} → {shown(r['after'])}" if r["before"] is not None else shown(r["after"])
        lines.append(f"| {r['name']} | {r['kind']} | {time_s} | {r['metric'] or '—'} | {change} |")
    return "\n".join(lines)


def print_summary(summary: dict[str, Any]) -> None:
    total = summary["seconds_this_run"]
    print(f"\n=== pipeline finished{f' in {total:.0f} s' if total is not None else ''}: {summary['output_dir']}\n")
    print(summary_table(summary))
    for qa in summary["answers"]:
        print(f"\nQ: {qa['question']}\nA: {qa['answer']}")
    if summary["report"]:
        print(f"\ncomparison report (base vs each stage): {summary['report']} (and report.html beside it)")
    print(f"summary: {Path(summary['output_dir']) / SUMMARY}")


def print_plan(steps: list[Step], first: int, last: int) -> None:
    print("every stage's config is valid; the plan:")
    for i, step in enumerate(steps):
        state = ("finished, skipped" if step.kind.is_done(step.out) else "runs") if first <= i < last else "not run"
        config = step.entry.config or "no YAML"
        print(f"\n{i + 1}. {step.entry.name} ({step.kind.name}, {config}) -> {step.out} [{state}]")
        for key, value in step.wired.items():
            print(f"     {key} = {value}  (wired)")
        for key, value in step.entry.overrides.items():
            print(f"     {key} = {value}")
