"""Rewards for PPO / GRPO: rule-based scores in verl's signature, usable by both backends.

    compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float | dict

`ppo.reward.functions` names built-in rewards (the registry below) or user functions as `path/to/file.py:function`
with the same signature. verl loads this very file by path (`reward.custom_reward_function.path`) and calls
`compute_score` with `reward_kwargs` naming the functions and weights; trl gets one reward function per entry
(`trl_reward_funcs`). This module imports only the standard library at the top, so that verl can load it by path in
any worker process.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import json
import math
import re
import sys
import traceback
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

RewardFn = Callable[..., Any]
VERL_SIGNATURE = "compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs)"
# A plain dict rather than core.registry.Registry: that would import self_model (and yaml) into verl's workers.
_REWARDS: dict[str, RewardFn] = {}
_LOADED: dict[str, RewardFn] = {}  # user functions by spec, loaded once per process


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make a reward function available to `ppo.reward.functions` under `name`."""
    def add(fn: RewardFn) -> RewardFn:
        if name in _REWARDS:
            raise ValueError(f"reward '{name}' is already registered")
        _REWARDS[name] = fn
        return fn

    return add


def builtin_rewards() -> list[str]:
    return list(_REWARDS)


# ---- built-in rule-based rewards ----------------------------------------------------------------------------
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_ANSWER = re.compile(r"^\s*<think>.+?</think>\s*<answer>.+?</answer>\s*$", re.DOTALL)
_EDGE_PUNCT = " \t\r\n.,;:!?'\"`()[]{}。，、；：！？“”‘’（）【】《》"


def extract_answer(text: str) -> str:
    """The text inside the last <answer>...</answer>, or the whole reply when it has no such tags."""
    found = _ANSWER_TAG.findall(text)
    return found[-1] if found else text


def normalize(text: str) -> str:
    """NFKC (full-width to half-width), lower case, inner whitespace collapsed, edge punctuation removed."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(text.split()).strip(_EDGE_PUNCT)


def _number(text: str) -> float | None:
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@register_reward("exact_match")
def exact_match(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None,
                **kwargs: Any) -> float:
    """1.0 when the answer (inside <answer> tags, if any), stripped of surrounding whitespace, equals ground_truth."""
    return float(extract_answer(solution_str).strip() == str(ground_truth).strip())


@register_reward("normalized_match")
def normalized_match(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None,
                     **kwargs: Any) -> float:
    """1.0 when the answer equals ground_truth after `normalize` ('Pancreas.' == 'pancreas', '３７' == '37'), or
    when both are the same number ('7' == '7.0'); else 0.0."""
    answer, truth = normalize(extract_answer(solution_str)), normalize(str(ground_truth))
    if answer == truth:
        return 1.0
    a, t = _number(answer), _number(truth)
    return float(a is not None and t is not None and a == t)


@register_reward("format")
def format_reward(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None,
                  **kwargs: Any) -> float:
    """1.0 when the reply is `<think>reasoning</think><answer>answer</answer>` and nothing else (the R1 format;
    ask for it in `ppo.system_prompt`), else 0.0."""
    return float(bool(_THINK_ANSWER.match(solution_str)))


@register_reward("length_penalty")
def length_penalty(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None,
                   **kwargs: Any) -> float:
    """0.0 up to a budget of characters, then falling linearly to -1.0 at twice the budget. The budget is
    `extra_info["max_reply_chars"]` when the row sets it, else 4 x the ground truth's length + 16."""
    budget = (extra_info or {}).get("max_reply_chars") or 4 * len(str(ground_truth)) + 16
    over = len(solution_str.strip()) - budget
    return -min(1.0, over / budget) if over > 0 else 0.0


# ---- user functions by path:function ------------------------------------------------------------------------
def split_spec(spec: str) -> tuple[str, str] | None:
    """'dir/file.py:function' -> (path, function); None for a built-in name."""
    if ":" not in spec:
        return None
    path, _, name = spec.rpartition(":")
    return path, name


def spec_problem(spec: str) -> str | None:
    """A cheap check that needs no import: a known built-in, or an existing .py file with a function name."""
    parts = split_spec(spec)
    if parts is None:
        if spec in _REWARDS:
            return None
        close = difflib.get_close_matches(spec, list(_REWARDS), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown reward '{spec}'{hint}; built-in: {builtin_rewards()}, or your own as path/to/file.py:function"
    path, name = parts
    if not path.endswith(".py") or not name.isidentifier():
        return f"'{spec}' is not of the form path/to/file.py:function"
    if not Path(path).is_file():
        return f"'{spec}': file not found: {path}"
    return None


def load_reward(spec: str) -> RewardFn:
    """The function a spec names: a built-in, or `file.py:function` imported and checked against verl's signature.

    Raises ValueError with file:line when the file does not import, lacks the function or has the wrong signature.
    """
    if spec in _REWARDS or spec in _LOADED:
        return _REWARDS.get(spec) or _LOADED[spec]
    if (problem := spec_problem(spec)) is not None:
        raise ValueError(problem)
    path, name = split_spec(spec)  # type: ignore[misc]
    file = str(Path(path).resolve())
    module_name = f"self_model_reward_{abs(hash(file))}"
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, file)
        module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
        sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
        module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything while importing; report where
        sys.modules.pop(module_name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ValueError(f"'{spec}' does not import: {_where(exc, file, path)}{type(exc).__name__}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module_name)
        raise ValueError(f"'{spec}': {path} defines no function '{name}' (functions there: {found})")
    check_signature(fn, f"{path}:{fn.__code__.co_firstlineno}" if hasattr(fn, "__code__") else spec)
    _LOADED[spec] = fn
    return fn


def _where(exc: BaseException, file: str, shown: str) -> str:
    """'file.py:LINE: ' of the deepest frame inside the user's file ('' when none is)."""
    if isinstance(exc, SyntaxError) and exc.filename and Path(exc.filename).resolve() == Path(file):
        return f"{shown}:{exc.lineno}: "
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == Path(file)]
    return f"{shown}:{lines[-1]}: " if lines else ""


def check_signature(fn: RewardFn, where: str) -> None:
    """verl calls rewards with keywords: the four names must be accepted as they are."""
    try:
        inspect.signature(fn).bind(data_source="d", solution_str="s", ground_truth="g", extra_info=None)
    except TypeError as exc:
        shown = f"{fn.__name__}{inspect.signature(fn)}"
        raise ValueError(f"{where}: {shown} has the wrong signature for a reward ({exc}); write it as "
                         f"{VERL_SIGNATURE}") from None


# ---- combining, and the two backends -------------------------------------------------------------------------
def score_value(result: Any, name: str) -> float:
    """A reward's result as a float: a number, or verl's {'score': number, ...}."""
    value = result.get("score") if isinstance(result, dict) else result
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"reward '{name}' returned {result!r}; expected a number or {{'score': number, ...}}")
    return float(value)


def reward_name(spec: str) -> str:
    parts = split_spec(spec)
    return spec if parts is None else parts[1]


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None,
                  rewards: list[str] | None = None, weights: list[float] | None = None,
                  **kwargs: Any) -> dict[str, float]:
    """verl's entry point: the weighted sum of `rewards` (built-in names or file.py:function) as 'score', and each
    part under its own name (verl logs them). `rewards` / `weights` come from `reward_kwargs` in the overrides."""
    specs = list(rewards or ["normalized_match"])
    weights = list(weights) if weights else [1.0] * len(specs)
    parts = {reward_name(spec): score_value(load_reward(spec)(data_source=data_source, solution_str=solution_str,
                                                               ground_truth=ground_truth, extra_info=extra_info,
                                                               **kwargs), spec) for spec in specs}
    total = sum(w * v for w, v in zip(weights, parts.values()))
    return {"score": total, **parts}


def completion_text(completion: Any) -> str:
    """trl passes a conversational completion as [{'role': 'assistant', 'content': ...}], a plain one as a string."""
    if isinstance(completion, list):
        return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))
    return str(completion)


def trl_reward_func(spec: str) -> RewardFn:
    """A trl GRPO reward function (completions + dataset columns in, a list of floats out) around a verl-style one."""
    fn, name = load_reward(spec), reward_name(spec)

    def reward(completions: list[Any], ground_truth: list[str], data_source: list[str] | None = None,
               extra_info: list[dict] | None = None, **kwargs: Any) -> list[float]:
        n = len(completions)
        sources = data_source or [""] * n
        # The dataset holds extra_info as JSON text: rows may carry different keys.
        infos = [json.loads(e) if isinstance(e, str) else e for e in extra_info or [None] * n]
        return [score_value(fn(data_source=d, solution_str=completion_text(c), ground_truth=g, extra_info=e), name)
                for c, g, d, e in zip(completions, ground_truth, sources, infos)]

    reward.__name__ = name  # trl logs rewards/<name>/mean
    return reward


def trl_reward_funcs(specs: list[str]) -> list[RewardFn]:
    return [trl_reward_func(spec) for spec in specs]
