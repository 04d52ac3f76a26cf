"""The whole pipeline from one YAML: clean data, extend the vocabulary, CPT, SFT, DPO, GRPO, merge, quantize,
evaluate and compare, chat. Each stage's output is the next stage's start; finished stages are skipped on a rerun.

    uv run python self_model/pipeline.py --config config/self_model_config/pipeline.yaml
    uv run python self_model/pipeline.py --config ... --dry-run          # check every stage's config, run nothing
    uv run python self_model/pipeline.py --config ... --from sft         # redo sft and every stage after it
    uv run python self_model/pipeline.py --config ... --only eval        # redo one stage
    uv run python self_model/pipeline.py --config ... base_model=Qwen/Qwen2.5-0.5B output_dir=runs/qwen

KEY=VALUE overrides set pipeline.yaml's top-level keys; a stage's own keys go in its `overrides:`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# Run by path, this folder would come first on sys.path and its packages (core, template, tools...) would shadow
# any top-level module of the same name; the project is imported as `self_model` instead.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from self_model.core.cli import setup_logging  # noqa: E402
from self_model.core.config import load_config  # noqa: E402
from self_model.core.errors import UserError  # noqa: E402
from self_model.tools.pipeline_config import PipelineConfig  # noqa: E402
from self_model.tools.pipeline_run import run_pipeline  # noqa: E402


def main(cfg: PipelineConfig, dry_run: bool = False, config_path: str = "config/self_model_config/pipeline.yaml",
         start: str | None = None, only: str | None = None) -> dict[str, Any]:
    return run_pipeline(cfg, config_path, start=start, only=only, dry_run=dry_run)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the pipeline's YAML (config/self_model_config/pipeline.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="check every stage's config and print the plan")
    parser.add_argument("--from", dest="start", metavar="STAGE", help="redo this stage and every stage after it")
    parser.add_argument("--only", metavar="STAGE", help="redo this stage alone (the stages before it have finished)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="top-level keys of the pipeline YAML")
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        cfg = load_config(PipelineConfig, args.config, args.overrides)
        main(cfg, args.dry_run, args.config, args.start, args.only)
    except UserError as exc:  # a failing stage says which, what finished and how to resume (PipelineStopped)
        print(f"\nerror: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished stages are kept; run the same command again to resume "
              f"(uv run python self_model/pipeline.py --config {args.config})", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
