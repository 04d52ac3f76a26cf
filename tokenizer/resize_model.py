"""Step 3 of vocabulary extension: give the base model rows for the merged tokenizer's new tokens. Each new
embedding (and untied LM-head) row starts at the mean of the token's sub-token rows under the old tokenizer
(fallback: the mean of all old rows); logits over the old vocabulary are checked to be unchanged.

    uv run python tokenizer/resize_model.py --config config/tokenizer_config/extend.yaml

Then continued pretraining with model_name_or_path: tokenizer/merged_model and
tokenizer_name_or_path: tokenizer/merged_tokenizer (the new rows are trained in full, also with LoRA).
"""

from __future__ import annotations

from pathlib import Path

from self_model.core.cli import run_main
from self_model.core.errors import ConfigError, UserError
from self_model.core.vocab_file import EXTENSION_FILE
from tokenizer.vocab.extend import ExtendConfig, detect_kind, file_digest, read_extension, staged_output, write_json
from tokenizer.vocab.resize import check_logits, check_pair, copy_tokenizer_files, grow, load_base_model, old_logits


def main(cfg: ExtendConfig, dry_run: bool = False) -> Path | None:
    if not cfg.base_model:
        raise ConfigError(["base_model: required by resize_model.py (the model the base tokenizer belongs to)"])
    ext = read_extension(cfg.merge.output_dir, "merge.output_dir")
    base = detect_kind(cfg.base_tokenizer)
    if ext.get("base_sha256") != file_digest(base.file):
        raise UserError(f"merge.output_dir: {cfg.merge.output_dir} was merged from {ext.get('base_tokenizer')}, not "
                        f"from base_tokenizer {base.file}; merge again (overwrite=true) or fix base_tokenizer")
    old, new = ext["vocab_before"], ext["vocab_after"]
    model = load_base_model(cfg.base_model, cfg.trust_remote_code)
    check_pair(model, old, cfg.base_model, str(base.file))
    if dry_run:
        print(f"would give {cfg.base_model} rows for {new - old} new tokens ({old} -> {new}): {cfg.resize.output_dir}")
        return None
    out = Path(cfg.resize.output_dir)
    with staged_output(out, cfg.overwrite, "resize.output_dir") as tmp:
        before = old_logits(model, old)
        report = grow(model, ext["new_tokens"], old, new, cfg.resize.pad_to_multiple_of)
        report["max_logit_difference_old_tokens"] = check_logits(model, before, old)  # raises: nothing is saved
        model.save_pretrained(tmp)
        copy_tokenizer_files(Path(cfg.merge.output_dir), tmp)
        write_json(tmp / EXTENSION_FILE, {**ext, "base_model": cfg.base_model, "resize": report})
    print(f"\nresized model saved to {out}: embedding rows {report['rows_before']} -> {report['rows_after']} "
          f"({'tied' if report['tied_embeddings'] else 'untied'} LM head)")
    print(f"  {report['from_sub_tokens']} new rows from the mean of their sub-tokens, {report['from_mean_of_all']} "
          f"from the mean of all rows; old-token logits unchanged (max difference "
          f"{report['max_logit_difference_old_tokens']:.1e})")
    print(f"  continued pretraining: model_name_or_path={out} tokenizer_name_or_path={cfg.merge.output_dir}")
    return out


if __name__ == "__main__":
    run_main(main, ExtendConfig, __doc__)
