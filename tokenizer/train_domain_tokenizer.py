"""Step 1 of vocabulary extension: train a domain tokenizer on the corpus, of the base tokenizer's kind (HF
`tokenizers` BPE for a byte-level BPE base, SentencePiece for a SentencePiece base), and list the candidate tokens
the base lacks (plus the word list's, after checks).

    uv run python tokenizer/train_domain_tokenizer.py --config config/tokenizer_config/extend.yaml
    uv run python tokenizer/train_domain_tokenizer.py --config ... train.vocab_size=8000 train.word_list=words.txt

Next: tokenizer/merge_tokenizer.py with the same --config.
"""

from __future__ import annotations

from pathlib import Path

from self_model.core.cli import run_main
from tokenizer.vocab.extend import (
    ExtendConfig,
    detect_kind,
    read_texts,
    read_word_list,
    staged_output,
    write_candidates,
)


def main(cfg: ExtendConfig, dry_run: bool = False) -> Path | None:
    base = detect_kind(cfg.base_tokenizer)
    texts = read_texts(cfg.corpus.train_file, cfg.corpus.text_fields)
    words = read_word_list(cfg.train.word_list)
    print(f"base tokenizer: {base.file} ({base.kind})")
    print(f"corpus: {len(texts)} documents, {sum(map(len, texts))} characters; word list: {len(words)} words")
    if dry_run:
        print(f"would train a {cfg.train.vocab_size}-token domain tokenizer into {cfg.train.output_dir}")
        return None
    t, out = cfg.train, Path(cfg.train.output_dir)
    with staged_output(out, cfg.overwrite, "train.output_dir") as tmp:
        if base.kind == "byte_level_bpe":
            from tokenizer.vocab.bpe import train_bpe

            candidates, report = train_bpe(base.file, texts, words, t.vocab_size, t.min_frequency, tmp)
        else:
            from tokenizer.vocab.spm import train_sp

            candidates, report = train_sp(base.file, texts, words, t.vocab_size, t.min_frequency,
                                          t.character_coverage, tmp)
        report["corpus"] = {"documents": len(texts), "characters": sum(map(len, texts))}
        write_candidates(tmp, base, candidates, report)
    print(f"\ndomain tokenizer ({report['domain_vocab_size']} tokens) saved to {out}")
    words_report = report["word_list"]
    print(f"candidates for the merge: {len(candidates)}: {report['domain_tokens_new']} learned tokens the base lacks "
          f"({report['domain_tokens_in_base']} it already has)"
          + (f", {words_report['added_forms']} from the word list ({len(words_report['already_in_base'])} already in "
             f"the base, {len(words_report['split_by_pre_tokenizer'])} split by its pre-tokenizer: skipped)"
             if words_report else ""))
    return out


if __name__ == "__main__":
    run_main(main, ExtendConfig, __doc__)
