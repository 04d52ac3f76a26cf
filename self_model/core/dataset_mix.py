"""Datasets by name, and several of them mixed in one run.

`config/datasets.yaml` names data sets: a local file (folder or glob for CPT) or a hub id, its row format and a
column mapping. A stage's `data.datasets: [{name, weight, max_samples}]` (GRPO: `ppo.datasets`) with `mix: concat |
interleave_under | interleave_over` replaces `train_file`: each data set is read by the stage's own reader (rows stay
cited `file:line`), capped, and mixed by the `datasets` library's `concatenate_datasets` / `interleave_datasets` over
row indices, seeded from the run's seed. Core knows no stage: the caller hands in its reader.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from self_model.core.config import did_you_mean, load_config, read_yaml
from self_model.core.corpus import resolve_entry
from self_model.core.errors import ConfigError, UserError
from self_model.core.rows import RENAMED_COLUMNS

T = TypeVar("T")
logger = logging.getLogger("self_model")
Mix = Literal["concat", "interleave_under", "interleave_over"]
STOPPING = {"interleave_under": "first_exhausted", "interleave_over": "all_exhausted"}
HUB_CACHE = Path.home() / ".cache" / "self_model" / "hub_datasets"


@dataclass
class DatasetRef:
    """One entry of `data.datasets`."""

    name: str
    # interleave_*: this data set's share of the mix; weights are normalised to sum to 1 (with a note).
    weight: float | None = None
    # Read at most this many rows of this data set (its first ones), before mixing.
    max_samples: int | None = None


@dataclass
class RegistryEntry:
    """One data set of the registry file."""

    path: str | list[str] | None = None  # local file(s); for CPT also a folder or a glob
    hub: str | None = None  # or a hub dataset id (org/name), read with datasets.load_dataset
    subset: str | None = None
    split: str = "train"
    format: str = "auto"  # a row format of the stage reading it (auto: detected per row)
    columns: dict[str, str] = field(default_factory=dict)  # the format's key -> this data set's column

    def __post_init__(self) -> None:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give either path (local files) or hub (a hub dataset id)")


@dataclass
class Source:
    """A resolved entry of `data.datasets`: what the stage's reader reads."""

    name: str
    entry: RegistryEntry
    where: str  # registry file:line, for messages
    weight: float | None
    max_samples: int | None

    @property
    def files(self) -> list[str]:
        if self.entry.hub:
            return [hub_rows_file(self)]
        paths = [self.entry.path] if isinstance(self.entry.path, str) else self.entry.path or []
        return [str(f) for p in paths for f in resolve_entry(p)]


def read_registry(path: str) -> dict[str, tuple[RegistryEntry, str]]:
    """name -> (entry, 'file:line'); every problem of the file at once, each cited file:line and key."""
    data = read_yaml(path)
    tree = yaml.compose(Path(path).read_text(encoding="utf-8"))
    lines = {k.value: k.start_mark.line + 1 for k, _ in tree.value} if tree is not None else {}
    entries, problems = {}, []
    for name, raw in data.items():
        where = f"{path}:{lines.get(name, '?')}"
        if not isinstance(raw, dict):
            problems.append(f"{where}: {name}: expected a mapping (path or hub, format, columns), got {raw!r}")
            continue
        try:
            entry = load_config(RegistryEntry, None, data=raw)
        except ConfigError as exc:
            top = "(top level): "  # a check across the entry's keys (RegistryEntry.__post_init__)
            problems += [f"{where}: {name}: {p.removeprefix(top)}" if p.startswith(top) else f"{where}: {name}.{p}"
                         for p in exc.problems]
            continue
        paths = [entry.path] if isinstance(entry.path, str) else entry.path or []
        problems += [f"{where}: {name}.path: nothing found at {p}" for p in paths if not resolve_entry(p)]
        entries[name] = (entry, where)
    if problems:
        raise ConfigError(problems, source=path)
    return entries


def mix_problems(train_file: Any, refs: list[DatasetRef] | None, mix: str, registry: str, key: str) -> list[str]:
    """Config checks for a section with `train_file` / `datasets` / `mix` / `dataset_registry` (prefix `key`)."""
    if train_file and refs:
        return [f"{key}.train_file / {key}.datasets: set one of them (datasets names data sets of {registry})"]
    if not refs:
        return []
    if not Path(registry).is_file():
        return [f"{key}.dataset_registry: file not found: {registry}"]
    try:
        known = read_registry(registry)
    except ConfigError as exc:
        return exc.problems
    names = [r.name for r in refs]
    problems = [f"{key}.datasets[{i}].name: unknown data set '{n}'{did_you_mean(n, known)}; {registry} names: "
                f"{sorted(known)}" for i, n in enumerate(names) if n not in known]
    problems += [f"{key}.datasets: '{n}' is named twice" for n in sorted({n for n in names if names.count(n) > 1})]
    problems += [f"{key}.datasets[{i}].max_samples: expected at least 1, got {r.max_samples}"
                 for i, r in enumerate(refs) if r.max_samples is not None and r.max_samples < 1]
    weights = [r.weight for r in refs]
    if mix == "concat" and any(w is not None for w in weights):
        problems.append(f"{key}.datasets: weights need {key}.mix: interleave_under or interleave_over (concat takes "
                        "every row of each; size a data set with its max_samples instead)")
    elif None in weights and any(w is not None for w in weights):
        problems.append(f"{key}.datasets: give every data set a weight, or none (equal shares)")
    elif any(w is not None and w <= 0 for w in weights):
        problems.append(f"{key}.datasets: weights must be positive (got {weights}); remove a data set instead of "
                        "giving it weight 0")
    return problems


def sources(refs: list[DatasetRef], registry: str) -> list[Source]:
    known = read_registry(registry)
    return [Source(r.name, *known[r.name], r.weight, r.max_samples) for r in refs]


@contextmanager
def renamed_columns(files: list[str], columns: dict[str, str]) -> Iterator[None]:
    """While reading `files`, the row reader renames the data set's columns to the format's keys (core.rows)."""
    keys = [Path(f).resolve() for f in files] if columns else []
    RENAMED_COLUMNS.update({k: columns for k in keys})
    try:
        yield
    finally:
        for k in keys:
            RENAMED_COLUMNS.pop(k, None)


def mix_sources(srcs: list[Source], read: Callable[[Source], list[T]], mix: str, seed: int
                ) -> tuple[list[T], list[dict[str, Any]]]:
    """Read each source with `read` (the stage's reader), cap it, mix them; returns the rows and the plan."""
    from datasets import Dataset, concatenate_datasets, interleave_datasets

    parts = []
    for src in srcs:
        with renamed_columns(src.files, src.entry.columns):
            rows = read(src)
        if not rows:
            raise UserError(f"data set '{src.name}' ({src.where}) has no usable rows")
        parts.append((len(rows), rows[: src.max_samples] if src.max_samples else rows))
    index = [Dataset.from_dict({"source": [i] * len(rows), "row": list(range(len(rows)))})
             for i, (_, rows) in enumerate(parts)]
    weights = [s.weight for s in srcs]
    probabilities = [w / sum(weights) for w in weights] if None not in weights else None  # type: ignore[operator]
    if probabilities and abs(sum(weights) - 1) > 1e-6:  # type: ignore[arg-type]
        logger.info("data.datasets: weights %s sum to %g; normalised to %s", weights, sum(weights),  # type: ignore
                    [round(p, 4) for p in probabilities])
    mixed = concatenate_datasets(index) if mix == "concat" else interleave_datasets(
        index, probabilities=probabilities, seed=seed, stopping_strategy=STOPPING[mix])  # type: ignore[arg-type]
    picks = list(zip(mixed["source"], mixed["row"], strict=True))
    counts = [sum(1 for i, _ in picks if i == k) for k in range(len(srcs))]
    plan = [{"name": s.name, "rows_read": read_n, "max_samples": s.max_samples, "rows_in_mix": counts[k],
             "share": round(counts[k] / max(len(picks), 1), 4),
             "weight": round(probabilities[k], 4) if probabilities else None}
            for k, (s, (read_n, _)) in enumerate(zip(srcs, parts, strict=True))]
    for line in plan_lines(plan, mix, seed):
        logger.info(line)
    return [parts[i][1][j] for i, j in picks], plan


def plan_lines(plan: list[dict[str, Any]], mix: str, seed: int) -> list[str]:
    """What --dry-run prints: rows per source and its effective share of the mix."""
    total = sum(p["rows_in_mix"] for p in plan)
    out = [f"data mix:   {mix} of {len(plan)} data sets (seed {seed}) -> {total} rows"]
    for p in plan:
        cap = f", capped at {p['max_samples']}" if p["max_samples"] else ""
        weight = f", weight {p['weight']:.2f}" if p["weight"] is not None else ""
        out.append(f"  {p['name']}: {p['rows_read']} rows read{cap} -> {p['rows_in_mix']} in the mix "
                   f"({100 * p['share']:.1f}%{weight})")
    return out


def hub_rows_file(src: Source) -> str:
    """A hub data set, downloaded once with datasets.load_dataset and kept as JSON Lines (rows cited file:line)."""
    entry = src.entry
    target = HUB_CACHE / entry.hub.replace("/", "__") / f"{entry.subset or 'default'}-{entry.split}.jsonl"  # type: ignore
    if target.is_file():
        return str(target)
    from datasets import load_dataset

    try:
        rows = load_dataset(entry.hub, entry.subset, split=entry.split)
    except (OSError, ValueError) as exc:  # offline, unknown id or split: the library's words say which
        raise UserError(f"data set '{src.name}' ({src.where}): cannot load {entry.hub} (split {entry.split}) from "
                        f"the hub: {str(exc)[:300]}\nOffline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)? Load it once "
                        "online, or download it (data_process/fetch_dataset.py) and give its file as path:") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    tmp.rename(target)
    return str(target)
