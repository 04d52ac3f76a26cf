r"""PPO (GAE advantages with a critic) with verl on a GPU cluster: Ray, vLLM / SGLang rollout, FSDP training.

    uv run --extra rlhf python self_model/rlhf/train_ppo.py --config config/self_model_config/rlhf.yaml \
        ppo.backend=verl
    uv run python self_model/rlhf/train_ppo.py --config ... ppo.backend=verl ppo.prepare_only=true  # run folder only
    uv run python self_model/rlhf/train_ppo.py --config ... ppo.backend=verl --dry-run              # the command

The run folder (`ppo.output_dir`, {algorithm} = ppo) gets verl's parquet data, the tokenizer with the chat template and
`verl_overrides.txt`, the exact `python -m verl.trainer.main_ppo ...` line, which is then launched here unless
`ppo.prepare_only` is set. trl 1.x has no PPO trainer, so `ppo.backend: trl` is refused with that reason; GRPO runs on
one machine with self_model/rlhf/train_grpo.py.
"""

from __future__ import annotations

from pathlib import Path

from self_model.core.cli import run_main
from self_model.rlhf.config import PPOStageConfig
from self_model.rlhf.ppo_grpo.verl_bridge import run_verl


def main(cfg: PPOStageConfig, dry_run: bool = False) -> Path | None:
    # PPOStageConfig.validate() has refused backend trl already (no PPO trainer in the installed trl).
    return run_verl(cfg, dry_run)


if __name__ == "__main__":
    run_main(main, PPOStageConfig, __doc__)
