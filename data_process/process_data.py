"""Clean, normalize, deduplicate and split training data; writes a report of everything it removed.

    uv run python data_process/process_data.py \
        --input data_process/fetch_data/finetune/shibing624_medical__train.jsonl \
        --output_dir data_process/final_data --subdir finetune --dedup --near_dedup
    uv run python data_process/process_data.py --config config/data_config/process.yaml --overwrite

Outputs in <output_dir>/<subdir>/: train.jsonl, validation.jsonl, report.json, report.md, lengths.png
(and rejected.jsonl with --keep_rejected). Every option: data_process/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from data_process.dataproc.options import ProcessConfig, load_process_config
from data_process.dataproc.pipeline import run
from data_process.dataproc.report import markdown
from self_model.core.cli import setup_logging
from self_model.core.errors import UserError


def main(cfg: ProcessConfig) -> Path:
    report = run(cfg)
    print(markdown(report))
    return cfg.out_dir


if __name__ == "__main__":
    setup_logging()
    try:
        main(load_process_config(description=__doc__))
    except UserError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
