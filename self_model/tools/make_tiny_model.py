"""Build the embedded default model offline: a tiny Qwen2-architecture model with random weights and a
byte-level BPE tokenizer trained on the project's sample corpus, with the ChatML special tokens.

    uv run python self_model/tools/make_tiny_model.py --output self_model/checkpoints/tiny_qwen2

It is small enough to fine-tune in seconds on a CPU; the README's first command and the tests use it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DIR = ROOT / "data_process" / "sample_data"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split: contractions, words, single digits, punctuation runs, newlines, spaces.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


# The files the embedded tokenizer was trained on. A fixed list, not a glob: sample files added later (KTO rows, the
# pipeline's demo data) must not change the tokenizer the tests build from the one shipped in checkpoints/tiny_qwen2.
TOKENIZER_CORPUS = ("dpo_eval.jsonl", "dpo_train.jsonl", "grpo_eval.jsonl", "grpo_train.jsonl", "pretrain.txt",
                    "pretrain_eval.txt", "sft_alpaca.jsonl", "sft_eval.jsonl", "sft_messages.jsonl", "sft_train.jsonl")


def corpus_texts(sample_dir: Path = SAMPLE_DIR) -> list[str]:
    """Every string in the sample files of TOKENIZER_CORPUS (plain text lines and all JSON string values)."""
    texts: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for path in (sample_dir / name for name in TOKENIZER_CORPUS if (sample_dir / name).is_file()):
        if path.suffix == ".txt":
            texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    walk(json.loads(line))
    if not texts:
        raise SystemExit(f"error: no sample corpus found under {sample_dir}")
    # Role names and template words appear in every rendered sample: make sure they are in the corpus.
    texts += ["system", "user", "assistant", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."]
    return texts


def build_tokenizer(texts: list[str], vocab_size: int) -> object:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token=None, model_max_length=2048, clean_up_tokenization_spaces=False)


def build_model(vocab_size: int, hidden: int, layers: int, seed: int) -> object:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 4,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True, use_cache=True,
                         eos_token_id=SPECIAL_TOKENS_IDS["<|endoftext|>"], bos_token_id=None,
                         pad_token_id=SPECIAL_TOKENS_IDS["<|endoftext|>"])
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


SPECIAL_TOKENS_IDS = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}


def make_tiny_model(output: Path, vocab_size: int = 3000, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    tokenizer = build_tokenizer(corpus_texts(), vocab_size)
    model = build_model(len(tokenizer), hidden, layers, seed)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(output)
    model.save_pretrained(output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, type=Path, help="folder to write the model and tokenizer to")
    parser.add_argument("--vocab-size", type=int, default=3000)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder already holds a model")
    args = parser.parse_args(argv)
    if (args.output / "config.json").exists() and not args.force:
        print(f"{args.output} already holds a model; keeping it (use --force to rebuild)")
        return
    if args.output.exists() and any(args.output.iterdir()) and not args.force:
        print(f"error: {args.output} exists and is not empty; choose another --output", file=sys.stderr)
        sys.exit(1)
    make_tiny_model(args.output, args.vocab_size, args.hidden_size, args.layers, args.seed)
    print(f"tiny model written to {args.output}")


if __name__ == "__main__":
    main()
