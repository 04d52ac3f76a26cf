"""The command line every entry script shares: --config, --trace, --deepspeed, --dry-run, KEY=VALUE overrides."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from self_model.core.config import load_config
from self_model.core.errors import UserError

T = TypeVar("T")
logger = logging.getLogger("self_model")


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes warns at import that an optional GPU-kernel package is missing; 4-bit works without it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's YAML file")
    parser.add_argument("--trace", choices=["none", "wandb", "swanlab"], help="overrides the YAML's trace:")
    parser.add_argument("--deepspeed", help="a DeepSpeed JSON (sets training_args.deepspeed)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate config, data, template and tokenizer, print the plan and exit")
    # The deepspeed launcher passes --local_rank; the rank also comes from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. training_args.learning_rate=1.0e-4 peft.enabled=false")
    return parser.parse_args(argv)


def load_stage_config(cls: type[T], args: argparse.Namespace) -> T:
    overrides = list(args.overrides)
    if args.trace:
        overrides.append(f"trace={args.trace}")
    if args.deepspeed:
        overrides.append(f"training_args.deepspeed={args.deepspeed}")
    return load_config(cls, args.config, overrides)


def run_main(main: Callable[..., Any], cls: type[T], description: str, argv: list[str] | None = None) -> None:
    """Parse, load the config, call main(cfg, dry_run=...); a UserError prints its message and exits non-zero."""
    setup_logging()
    args = parse_args(description, argv)
    code = 0
    try:
        cfg = load_stage_config(cls, args)
        main(cfg, dry_run=args.dry_run)
    except UserError as exc:  # RunInterrupted (SIGTERM / SIGINT) says "interrupted:" and how to resume
        print(f"\n{getattr(exc, 'label', 'error')}: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted: no final/ was written; resume with training_args.resume_from_checkpoint=auto",
              file=sys.stderr)
        code = 130
    finally:
        _destroy_process_group()
    if code:
        sys.exit(code)


def _destroy_process_group() -> None:
    """torchrun on CPU (gloo) aborts at exit now and then without this."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at shutdown; the run's result is already decided
        pass
