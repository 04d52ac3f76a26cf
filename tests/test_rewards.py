"""Rewards for PPO / GRPO: the built-ins, user functions by path:function (with file:line errors), the combined
verl entry point, the trl adapter, and that verl can load rewards.py by path with nothing but the standard library."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from self_model.rlhf.ppo_grpo import rewards
from self_model.rlhf.ppo_grpo.rewards import (
    compute_score,
    exact_match,
    format_reward,
    length_penalty,
    load_reward,
    normalized_match,
    spec_problem,
    trl_reward_func,
)


def score(fn, reply: str, truth: str, extra: dict | None = None) -> float:
    return fn(data_source="grpo_train", solution_str=reply, ground_truth=truth, extra_info=extra)


def write(tmp_path: Path, name: str, source: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return str(path)


# ---- built-ins --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("reply", "truth", "exact", "normalized"), [
    ("37", "37", 1.0, 1.0),
    (" 37\n", "37", 1.0, 1.0),
    ("３７。", "37", 0.0, 1.0),            # full-width digits and a Chinese full stop
    ("Pancreas.", "pancreas", 0.0, 1.0),
    ("7", "7.0", 0.0, 1.0),               # the same number
    ("High  blood pressure", "high blood pressure", 0.0, 1.0),
    ("<think>glucose</think><answer>胰腺</answer>", "胰腺", 1.0, 1.0),  # the answer inside <answer> tags counts
    ("38", "37", 0.0, 0.0),
    ("胰腺和肝", "胰腺", 0.0, 0.0),
    ("", "37", 0.0, 0.0),
])
def test_match_rewards(reply: str, truth: str, exact: float, normalized: float) -> None:
    assert score(exact_match, reply, truth) == exact
    assert score(normalized_match, reply, truth) == normalized


def test_format_reward_wants_think_then_answer_and_nothing_else() -> None:
    assert score(format_reward, "<think>the pancreas makes it</think>\n<answer>胰腺</answer>", "胰腺") == 1.0
    assert score(format_reward, "<answer>胰腺</answer>", "胰腺") == 0.0
    assert score(format_reward, "<think>x</think><answer>胰腺</answer> and more", "胰腺") == 0.0
    assert score(format_reward, "胰腺", "胰腺") == 0.0


def test_length_penalty_is_zero_within_budget_then_linear_to_minus_one() -> None:
    # budget = 4 x len("37") + 16 = 24 characters
    assert score(length_penalty, "3" * 24, "37") == 0.0
    assert score(length_penalty, "3" * 36, "37") == pytest.approx(-0.5)
    assert score(length_penalty, "3" * 500, "37") == -1.0
    assert score(length_penalty, "3" * 20, "37", {"max_reply_chars": 10}) == -1.0


def test_builtins_have_verls_signature_and_accept_extra_keywords() -> None:
    for name in rewards.builtin_rewards():
        fn = load_reward(name)
        rewards.check_signature(fn, name)
        # verl adds keywords (reward_router_address, ...) when a reward model is served
        assert isinstance(fn(data_source="d", solution_str="x", ground_truth="x", extra_info=None,
                             reward_router_address=None), float)


def test_unknown_builtin_suggests_the_closest_name() -> None:
    problem = spec_problem("normalised_match")
    assert "unknown reward 'normalised_match'" in problem and "did you mean 'normalized_match'" in problem
    assert "path/to/file.py:function" in problem


# ---- user functions by path:function -----------------------------------------------------------------------------
def test_user_function_loads_and_scores(tmp_path: Path) -> None:
    spec = write(tmp_path, "mine.py", """
        def starts_with_answer(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
            return {"score": float(solution_str.startswith(ground_truth)), "note": 1}
    """) + ":starts_with_answer"
    fn = load_reward(spec)
    assert fn is load_reward(spec)  # imported once
    assert compute_score("d", "37 degrees", "37", rewards=[spec])["score"] == 1.0


def test_syntax_error_in_a_reward_file_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.py", "def f(data_source, solution_str, ground_truth, extra_info=None):\n"
                                        "    return 1.0\n\ndef g(:\n    pass\n")
    with pytest.raises(ValueError, match=rf"does not import: {path}:4: SyntaxError"):
        load_reward(f"{path}:f")


def test_error_while_importing_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "raises.py", "import os\n\nTABLE = undefined_name\n")
    with pytest.raises(ValueError, match=rf"does not import: {path}:3: NameError: name 'undefined_name'"):
        load_reward(f"{path}:f")


def test_missing_function_lists_what_the_file_defines(tmp_path: Path) -> None:
    path = write(tmp_path, "other.py", "def accuracy(data_source, solution_str, ground_truth, extra_info=None):\n"
                                       "    return 0.0\n")
    with pytest.raises(ValueError, match=r"defines no function 'acuracy' \(functions there: \['accuracy'\]\)"):
        load_reward(f"{path}:acuracy")


def test_wrong_signature_is_refused_with_the_expected_one(tmp_path: Path) -> None:
    path = write(tmp_path, "trl_style.py", "\n\ndef reward(completions, **kwargs):\n    return [0.0]\n")
    with pytest.raises(ValueError) as err:
        load_reward(f"{path}:reward")
    message = str(err.value)
    assert f"{path}:3: reward(completions, **kwargs) has the wrong signature" in message
    assert rewards.VERL_SIGNATURE in message


def test_spec_problems_without_importing(tmp_path: Path) -> None:
    assert "file not found" in spec_problem(f"{tmp_path}/nope.py:f")
    assert "is not of the form path/to/file.py:function" in spec_problem("rewards.txt:f")
    assert "is not of the form" in spec_problem(f"{tmp_path}/x.py:not-an-identifier")


# ---- combining, and the trl adapter ------------------------------------------------------------------------------
def test_compute_score_is_the_weighted_sum_with_each_part_logged() -> None:
    result = compute_score("d", "37" + "x" * 34, "37", rewards=["exact_match", "length_penalty"], weights=[1.0, 2.0])
    assert result == {"score": pytest.approx(2.0 * -0.5), "exact_match": 0.0, "length_penalty": pytest.approx(-0.5)}
    assert compute_score("d", "37", "37")["score"] == 1.0  # no rewards named: normalized_match


def test_a_non_number_result_is_an_error_naming_the_reward(tmp_path: Path) -> None:
    spec = write(tmp_path, "bad_result.py", """
        def r(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
            return "high"
    """) + ":r"
    with pytest.raises(TypeError, match=r"reward '.*bad_result.py:r' returned 'high'; expected a number"):
        compute_score("d", "x", "y", rewards=[spec])


def test_trl_adapter_passes_completions_and_dataset_columns() -> None:
    fn = trl_reward_func("normalized_match")
    assert fn.__name__ == "normalized_match"  # trl logs rewards/normalized_match/mean
    completions = [[{"role": "assistant", "content": "胰腺。"}], [{"role": "assistant", "content": "肝"}], "胰腺"]
    out = fn(prompts=[[]] * 3, completions=completions, completion_ids=[[1]] * 3, ground_truth=["胰腺"] * 3,
             data_source=["t"] * 3, extra_info=[json.dumps({"source": "a.jsonl:1"})] * 3, trainer_state=None)
    assert out == [1.0, 0.0, 1.0]
    budget = trl_reward_func("length_penalty")
    assert budget(completions=["x" * 20], ground_truth=["37"], extra_info=[json.dumps({"max_reply_chars": 10})]) \
        == [-1.0]


def test_verl_can_load_rewards_py_by_path_with_only_the_standard_library(tmp_path: Path) -> None:
    """verl loads reward.custom_reward_function.path as a file in its workers: no self_model import may be needed.
    `python -S` has no site-packages at all."""
    user = write(tmp_path, "mine.py", "def one(data_source, solution_str, ground_truth, extra_info=None, **kw):\n"
                                      "    return 1.0\n")
    code = textwrap.dedent(f"""
        import importlib.util, json
        spec = importlib.util.spec_from_file_location("custom_module_x", {str(Path(rewards.__file__))!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(json.dumps(module.compute_score("d", "<answer>37</answer>", "37", None,
                                              rewards=["normalized_match", {user + ':one'!r}], weights=[1.0, 0.5])))
    """)
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"score": 1.5, "normalized_match": 1.0, "one": 1.0}
