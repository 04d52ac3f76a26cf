"""`vocab_extension.json`: what a vocabulary extension (tokenizer/) leaves in the merged tokenizer and the resized
model. Continued pretraining reads it to train the new embedding rows in full, also with LoRA."""

from __future__ import annotations

import json
from pathlib import Path

EXTENSION_FILE = "vocab_extension.json"


def extension_rows(model_path: str | Path) -> list[int]:
    """Embedding rows added by tokenizer/resize_model.py to the model saved at `model_path` (empty otherwise)."""
    path = Path(str(model_path)) / EXTENSION_FILE
    if not path.is_file():
        return []
    return list(json.loads(path.read_text(encoding="utf-8")).get("resize", {}).get("new_rows", []))
