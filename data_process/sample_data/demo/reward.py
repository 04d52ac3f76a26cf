"""The pipeline demo's GRPO reward (ppo.reward.functions: [data_process/sample_data/demo/reward.py:department]).

verl's reward signature; standard library only, like the built-in rewards (self_model/rlhf/ppo_grpo/rewards.py).
"""

from __future__ import annotations

from typing import Any


def department(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None,
               **kwargs: Any) -> float:
    """1.0 when the reply names the department asked for, plus up to 0.5 for answering in few characters (the
    question asks for the name only). The SFT model answers at length (its answers name a department at the end), so
    the replies to one prompt differ in both parts and GRPO has something to learn from the first step."""
    reply = solution_str.strip()
    brevity = 0.5 * max(0.0, 1.0 - len(reply) / 40) if reply else 0.0
    return float(str(ground_truth) in reply) + brevity
