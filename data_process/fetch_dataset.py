"""Fetch a dataset from the Hugging Face Hub (or a local copy) into data_process/fetch_data/ as JSON Lines.

    uv run python data_process/fetch_dataset.py --dataset_name shibing624/medical --data_subdir finetune
    uv run python data_process/fetch_dataset.py --dataset_name path/to/medical.parquet --data_subdir finetune

Writes data_process/fetch_data/<data_subdir>/<name>__<split>.jsonl for every split (the name with '/'
turned into '_'). Without network it fails at once and says how to use a local copy or the cache.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_process.dataproc.fetch import fetch
from self_model.core.cli import setup_logging
from self_model.core.errors import UserError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", required=True,
                        help="hub id (org/name), or a local .jsonl/.json/.parquet/.csv/.txt file or folder")
    parser.add_argument("--config_name", help="the dataset configuration (default: --data_subdir when the dataset "
                                              "has a configuration of that name)")
    parser.add_argument("--split", help="one split, e.g. train or train[:1000] (default: every split)")
    parser.add_argument("--revision", help="a branch, tag or commit of the hub dataset")
    parser.add_argument("--data_subdir", default="finetune", help="subfolder of the output (default: finetune)")
    parser.add_argument("--output_dir", default="data_process/fetch_data", help="(default: data_process/fetch_data)")
    parser.add_argument("--overwrite", action="store_true", help="replace files fetched before")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> list[Path]:
    paths = fetch(args.dataset_name, args.data_subdir, args.output_dir, args.config_name, args.split, args.revision,
                  args.overwrite)
    for path in paths:
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    setup_logging()
    try:
        main(parse_args())
    except UserError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
