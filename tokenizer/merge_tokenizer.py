"""Step 2 of vocabulary extension: add the domain tokens to the base tokenizer. Byte-level BPE: each new token
with the merges that build it (normal encoding produces it); SentencePiece: the pieces appended to the model.
Every old token keeps its id; special tokens and the chat template are kept; text without new tokens encodes
exactly as before. Writes the merged tokenizer and its report (vocab_extension.json), and prints the gain.

    uv run python tokenizer/merge_tokenizer.py --config config/tokenizer_config/extend.yaml

Next: tokenizer/resize_model.py with the same --config.
"""

from __future__ import annotations

from pathlib import Path

from self_model.core.cli import run_main
from self_model.core.vocab_file import EXTENSION_FILE
from tokenizer.vocab.extend import (
    MEASURED_TRAIN_DOCS,
    ExtendConfig,
    detect_kind,
    read_candidates,
    read_texts,
    staged_output,
    summary_lines,
    verify_extension,
    write_json,
)


def main(cfg: ExtendConfig, dry_run: bool = False) -> Path | None:
    base = detect_kind(cfg.base_tokenizer)
    domain = read_candidates(cfg.train.output_dir, base)
    train = read_texts(cfg.corpus.train_file, cfg.corpus.text_fields)[:MEASURED_TRAIN_DOCS]
    held_out = read_texts(cfg.corpus.eval_file, cfg.corpus.text_fields)
    if dry_run:
        print(f"would merge {len(domain['candidates'])} candidates into {base.file} -> {cfg.merge.output_dir}")
        return None
    if base.kind == "byte_level_bpe":
        from tokenizer.vocab.bpe import write_merged_bpe as write_merged
    else:
        from tokenizer.vocab.spm import write_merged_sp as write_merged
    out = Path(cfg.merge.output_dir)
    with staged_output(out, cfg.overwrite, "merge.output_dir") as tmp:
        merged, before, after, new_ids = write_merged(base.folder, base.file, domain["candidates"], tmp,
                                                      cfg.trust_remote_code)
        checks = verify_extension(before, after, new_ids, train, held_out)  # raises: nothing is written
        sources = [t["source"] for t in merged["new_tokens"]]
        report = {"kind": base.kind, "base_tokenizer": str(base.file), "base_sha256": domain["base_sha256"],
                  "domain_tokenizer": cfg.train.output_dir, "vocab_before": merged["vocab_before"],
                  "vocab_after": merged["vocab_after"], "new_tokens_count": len(new_ids),
                  "counts": {s: sources.count(s) for s in dict.fromkeys(sources)}, "training": domain["report"],
                  **checks, **{k: v for k, v in merged.items() if k not in checks}}
        write_json(tmp / EXTENSION_FILE, report)
    print(f"\nmerged tokenizer saved to {out} (report: {out / EXTENSION_FILE})")
    for line in summary_lines(report):
        print("  " + line)
    if not held_out:
        print("  (no corpus.eval_file: the gain above is measured on the training text, which overstates it)")
    return out


if __name__ == "__main__":
    run_main(main, ExtendConfig, __doc__)
