"""Answer every prompt of a JSONL file: batched with left padding, a progress bar, resumable.

    uv run python self_model/tools/generate.py --model self_model/checkpoints/finetune/final \\
        --input data_process/sample_data/sft_eval.jsonl --output answers.jsonl generation.temperature=0
    uv run python self_model/tools/generate.py --config config/self_model_config/inference.yaml batch.batch_size=16

Input rows: any chat format (sharegpt, messages, alpaca; a last assistant turn is dropped and kept as
`reference`) or {"prompt": "...", "system": "..."}. Every row is checked before the model is loaded (bad rows
and prompts longer than the context are listed as file:line, and nothing is written). Each output row,
{"source": "file:line", "messages": [...], "answer": "...", "reference": "..."}, is appended and flushed when its
batch is done; running the same command again answers only the rows not yet in the output.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from self_model.core.backend_args import check_backend_args
from self_model.core.cli import run_main
from self_model.core.config import existing_files
from self_model.core.conversations import detect_format, get_format, row_tools, validate_conversation
from self_model.core.errors import UserError
from self_model.core.inference import (
    GenerationSettings,
    Messages,
    ModelFolder,
    TransformersEngine,
    context_length,
    inspect_model,
    load_inference_model,
    load_inference_tokenizer,
    prompt_ids,
    stop_token_ids,
)
from self_model.core.rows import OneFormatPerFile, RowError, parse_json_line, read_rows
from self_model.core.stage_config import local_or_hub
from self_model.template.chat_template import load_template

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "self_model_config" / "inference.yaml"
PROMPT_EXAMPLE = '{"prompt": "...", "system": "..."}'
VLLM_ENGINE_ARGS = "vllm.engine.arg_utils:EngineArgs"
logger = logging.getLogger("self_model")


# ---- the inference YAML and its backends (chat.py and serve.py use them too) ---------------------------------
@dataclass
class BatchSection:
    """`batch:` generate.py's files."""

    input_file: str | None = None  # checked by generate.py only: chat.py and serve.py never read it
    output_file: str | None = None
    batch_size: int = 8
    format: str = "auto"  # auto / sharegpt / messages / alpaca / prompt


@dataclass
class ServerSection:
    """`server:` serve.py's address."""

    host: str = "127.0.0.1"
    port: int = 8000


def check_vllm_args(args: dict[str, Any], path: str) -> list[str]:
    """Checked against vLLM's own EngineArgs where vLLM is installed (elsewhere they are never used)."""
    return check_backend_args(args, VLLM_ENGINE_ARGS, path) if importlib.util.find_spec("vllm") else []


@dataclass
class InferenceConfig:
    model_name_or_path: str = field(metadata={"check": local_or_hub})
    # A project template JSON (self_model/template/*.json) for a folder saved without a chat template.
    template_path: str | None = field(default=None, metadata={"check": existing_files})
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: float32 on CPU, the weights' on GPU
    trust_remote_code: bool = False
    system_prompt: str | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    batch: BatchSection = field(default_factory=BatchSection)
    server: ServerSection = field(default_factory=ServerSection)
    # Passed to vllm.LLM / `vllm serve` (gpu_memory_utilization, max_model_len, tensor_parallel_size, ...).
    vllm_args: dict[str, Any] = field(default_factory=dict, metadata={"check": check_vllm_args})


def inference_argv(argv: list[str], default_config: Path) -> list[str]:
    """The tools' shortcuts (`--model X --input a.jsonl --output b.jsonl --system S`) as dotted overrides; the
    shipped inference.yaml when no --config is given."""
    keys = {"--model": "model_name_or_path", "--input": "batch.input_file", "--output": "batch.output_file",
            "--system": "system_prompt", "--template-path": "template_path", "--backend": "backend"}
    out: list[str] = []
    items = iter(argv)
    for arg in items:
        flag, _, value = arg.partition("=")
        if flag in keys:
            out.append(f"{keys[flag]}={value or next(items, '')}")
        else:
            out.append(arg)
    return out if "--config" in out or any(a.startswith("--config=") for a in out) else [
        "--config", str(default_config), *out]


class VllmEngine:
    """vLLM's offline `LLM` on the same rendered prompt ids; an adapter through vLLM's LoRA support."""

    name = "vllm"

    def __init__(self, cfg: InferenceConfig, folder: ModelFolder, tokenizer: Any, stop_ids: list[int],
                 context: int | None):
        from vllm import LLM

        self.tokenizer, self.stop_ids, self.lora = tokenizer, stop_ids, None
        kwargs: dict[str, Any] = {"model": folder.base or folder.path, "tokenizer": folder.path, "seed":
                                  cfg.generation.seed, "trust_remote_code": cfg.trust_remote_code,
                                  "dtype": cfg.dtype, **cfg.vllm_args}
        if folder.kind == "adapter":
            from vllm.lora.request import LoRARequest

            kwargs.update(enable_lora=True, max_lora_rank=lora_rank_slot(folder.lora_rank))
            self.lora = LoRARequest("adapter", 1, folder.path)
        self.llm, self.context = LLM(**kwargs), context
        self.last_tokens, self.last_seconds = 0, 0.0

    def generate(self, conversations: list[Messages], settings: GenerationSettings, batch_size: int = 0,
                 tools: list[list[Any] | None] | None = None) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                top_p=1.0 if settings.greedy else settings.top_p, top_k=settings.top_k or -1,
                                repetition_penalty=settings.repetition_penalty, stop_token_ids=self.stop_ids,
                                skip_special_tokens=True)
        prompts = [{"prompt_token_ids": prompt_ids(self.tokenizer, m, tools[i] if tools else None, self.context)}
                   for i, m in enumerate(conversations)]
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, params, lora_request=self.lora, use_tqdm=False)
        self.last_seconds = time.perf_counter() - start
        self.last_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        return [o.outputs[0].text.strip() for o in outputs]

    def stream(self, messages: Messages, settings: GenerationSettings) -> Iterator[str]:
        yield self.generate([messages], settings)[0]  # the offline engine answers whole


Engine = TransformersEngine | VllmEngine


def lora_rank_slot(rank: int | None) -> int:
    """vLLM's max_lora_rank takes a power of two (8, 16, 32, ...): the smallest one that holds the adapter."""
    return 1 << max(3, ((rank or 8) - 1).bit_length())


def choose_backend(wanted: str) -> str:
    has_vllm, has_gpu = importlib.util.find_spec("vllm") is not None, torch.cuda.is_available()
    if wanted == "vllm" and not (has_vllm and has_gpu):
        missing = [m for m, ok in (("the vllm package (uv sync --extra vllm; it conflicts with the rlhf extra)",
                                    has_vllm), ("a CUDA GPU (torch.cuda.is_available() is false here)", has_gpu))
                   if not ok]
        raise UserError(f"backend: vllm needs {' and '.join(missing)}. Use backend: transformers (or auto, which "
                        "picks vLLM only where both are present).")
    return "vllm" if wanted == "vllm" or (wanted == "auto" and has_vllm and has_gpu) else "transformers"


def load_engine(cfg: InferenceConfig, template: Any = None) -> Engine:
    """The model of `cfg.model_name_or_path` ready to answer, on the backend `cfg.backend` resolves to."""
    folder = inspect_model(cfg.model_name_or_path)
    backend = choose_backend(cfg.backend)
    tokenizer = load_inference_tokenizer(folder, template, cfg.trust_remote_code)
    stops = stop_token_ids(folder, tokenizer, template)
    logger.info("loading %s (%s) on %s", folder.path, folder.kind, backend)
    if backend == "vllm":
        return VllmEngine(cfg, folder, tokenizer, stops, folder_context(cfg, folder, backend))
    from transformers import set_seed

    set_seed(cfg.generation.seed)
    return TransformersEngine(load_inference_model(folder, cfg.dtype, cfg.trust_remote_code), tokenizer, stops)


def folder_context(cfg: InferenceConfig, folder: ModelFolder, backend: str) -> int | None:
    """The longest sequence the model takes (vLLM's max_model_len where set), read without loading weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder.base or folder.path, trust_remote_code=cfg.trust_remote_code)
    return (backend == "vllm" and cfg.vllm_args.get("max_model_len")) or context_length(config)


# ---- prompts and answers ----------------------------------------------------------------------------------------
def row_format(row: dict[str, Any], fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if "instruction" in row and "output" not in row:
        return "alpaca"  # a question without its answer
    try:
        return detect_format(row)
    except RowError as exc:
        if isinstance(row.get("prompt"), str):
            return "prompt"
        raise RowError(f"{exc}\n    prompt: {PROMPT_EXAMPLE}") from None


def to_prompt(row: dict[str, Any], fmt: str) -> tuple[list[dict[str, Any]], str | None]:
    """(the conversation to answer, the reference answer the row carried or None)."""
    if fmt == "prompt":
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise RowError(f"'prompt' must be a non-empty string; expected {PROMPT_EXAMPLE}")
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return [*system, {"role": "user", "content": row["prompt"]}], None
    messages = get_format(fmt).convert({"output": "", **row} if fmt == "alpaca" else row)
    reference = messages.pop()["content"] if messages[-1]["role"] == "assistant" else None
    if not messages or messages[-1]["role"] not in ("user", "tool"):
        raise RowError("nothing to answer: the conversation has no user turn before its last assistant turn")
    validate_conversation([*messages, {"role": "assistant", "content": "(the answer)"}])
    return messages, reference or None


def read_prompts(path: str, fmt: str = "auto",
                 measure: Callable[[list[dict[str, Any]], list[Any] | None], Any] | None = None
                 ) -> list[dict[str, Any]]:
    """Every row of `path` as {"source", "messages", "tools"?, "reference"?}; `measure(messages, tools)` raises a
    RowError for a prompt the model cannot take. One DataError lists every bad row (file:line)."""
    if fmt not in ("auto", "prompt"):
        try:
            get_format(fmt)
        except UserError as exc:
            raise UserError(f"batch.format: {exc}, prompt") from None
    one_format = OneFormatPerFile()

    def convert(row: dict[str, Any], loc: str, file: Path) -> dict[str, Any]:
        name = row_format(row, fmt)
        one_format.check(file, name, loc)
        messages, reference = to_prompt(row, name)
        tools = row_tools(row)
        if measure:
            measure(messages, tools)
        out: dict[str, Any] = {"source": loc, "messages": messages}
        return {**out, **({"tools": tools} if tools else {}), **({"reference": reference} if reference else {})}

    return read_rows(path, convert, hint="Fix these rows (nothing was generated).")


def answered(output: Path, prompts: list[dict[str, Any]], repair: bool) -> set[str]:
    """The sources already answered in `output`. A last line cut short by a crash is removed (when `repair`)."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if complete != data and repair:
        with output.open("r+b") as fh:
            fh.truncate(len(complete))
        print(f"{output}: removed an incomplete last row (it is generated again)", file=sys.stderr)
    known = {_key(p["source"]) for p in prompts}
    done = set()
    for lineno, raw in enumerate(complete.splitlines(), 1):
        if not raw.strip():
            continue
        row = parse_json_line(raw)
        if isinstance(row, RowError) or not {"source", "answer"} <= set(row):
            raise UserError(f"{output}:{lineno}: not an answer row of generate.py; choose another --output "
                            "(or delete it)")
        if _key(row["source"]) not in known:
            raise UserError(f"{output}:{lineno}: answers {row['source']}, which is not a row of the input; this "
                            "output belongs to another input file: choose another --output")
        done.add(_key(row["source"]))
    return done


def _key(source: str) -> str:
    return Path(source).name  # file:line without its folder: the same input given as ./a.jsonl or /abs/a.jsonl


def main(cfg: InferenceConfig, dry_run: bool = False) -> Path | None:
    from tqdm import tqdm

    if not cfg.batch.input_file or not cfg.batch.output_file:
        raise UserError("generate.py needs batch.input_file and batch.output_file "
                        "(--input prompts.jsonl --output answers.jsonl)")
    output = Path(cfg.batch.output_file)
    if output.resolve() == Path(cfg.batch.input_file).resolve():
        raise UserError(f"batch.output_file is the input file {output}; choose another output")
    template = load_template(cfg.template_path) if cfg.template_path else None
    folder, backend = inspect_model(cfg.model_name_or_path), choose_backend(cfg.backend)
    tokenizer = load_inference_tokenizer(folder, template, cfg.trust_remote_code)
    context = folder_context(cfg, folder, backend)
    prompts = read_prompts(cfg.batch.input_file, cfg.batch.format,
                           lambda messages, tools: prompt_ids(tokenizer, messages, tools, context))
    done = answered(output, prompts, repair=not dry_run)
    todo = [p for p in prompts if _key(p["source"]) not in done]
    if dry_run:
        print(f"would answer {len(todo)} of {len(prompts)} prompts ({len(done)} already in {output}) with "
              f"{folder.path} ({folder.kind}) on {backend}, batches of {cfg.batch.batch_size}; {cfg.generation}")
        return None
    if not todo:
        print(f"all {len(prompts)} prompts are already answered in {output}")
        return output
    engine = load_engine(cfg, template)
    written, tokens, seconds = 0, 0, 0.0
    fh = None  # opened with the first answers: a failure before them leaves no file behind
    try:
        with tqdm(total=len(prompts), initial=len(done), unit="prompt", desc="generating") as bar:
            for i in range(0, len(todo), cfg.batch.batch_size):
                chunk = todo[i:i + cfg.batch.batch_size]
                answers = engine.generate([p["messages"] for p in chunk], cfg.generation, cfg.batch.batch_size,
                                          [p.get("tools") for p in chunk])
                tokens, seconds = tokens + engine.last_tokens, seconds + engine.last_seconds
                if fh is None:
                    output.parent.mkdir(parents=True, exist_ok=True)
                    fh = output.open("a", encoding="utf-8")
                for prompt, answer in zip(chunk, answers):
                    fh.write(json.dumps({**prompt, "answer": answer}, ensure_ascii=False) + "\n")
                    fh.flush()
                    written += 1
                bar.update(len(chunk))
    except KeyboardInterrupt:
        raise UserError(f"interrupted: {len(done) + written} of {len(prompts)} answers are in {output}; run the "
                        "same command again to answer the rest") from None
    finally:
        if fh is not None:
            fh.close()
    print(f"{written} answers written to {output} ({len(done)} were there already); "
          f"{tokens} tokens in {seconds:.1f}s ({tokens / max(seconds, 1e-9):.1f} tokens/s)")
    return output


if __name__ == "__main__":
    run_main(main, InferenceConfig, __doc__, inference_argv(sys.argv[1:], DEFAULT_CONFIG))
