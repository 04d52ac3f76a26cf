"""Answering with a trained model: load any result folder, render with its saved chat template, generate.

One code path for every answer the toolkit gives: the SFT run's closing answer, `self_model/tools/chat.py`
(streamed), `self_model/tools/generate.py` (batched, left padding) and evaluation (`generate_answers`).
A folder is a run's `final/`, an export or a quantized export, holding full weights (`config.json`) or a LoRA
adapter (`adapter_config.json`, merged into its base in memory). The prompt is rendered with the folder's own
`chat_template` and generation stops on the ids of its `generation_config.json`; a folder without a template
gets one from the caller (`template_path`, applied by the tool: core does not import the template package).
The inference YAML, the backend choice and the vLLM engine belong to the tools (`self_model/tools/generate.py`).
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from self_model.core.errors import UserError
from self_model.core.lineage import adapter_base
from self_model.core.rows import RowError

logger = logging.getLogger("self_model")
Messages = list[dict[str, Any]]


# ---- the `generation:` settings -----------------------------------------------------------------------------
@dataclass
class GenerationSettings:
    """`generation:` how answers are sampled; these values replace the model's own sampling defaults."""

    max_new_tokens: int = 512
    temperature: float = 0.7  # 0 = greedy (deterministic)
    top_p: float = 0.9
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int = 42

    def __post_init__(self) -> None:
        problems = [f"generation.{k} {why}" for k, bad, why in (
            ("max_new_tokens", self.max_new_tokens < 1, "must be at least 1"),
            ("temperature", self.temperature < 0, "must be >= 0 (0 = greedy)"),
            ("top_p", not 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k < 0, "must be >= 0 (0 = off)"),
            ("repetition_penalty", self.repetition_penalty <= 0, "must be > 0 (1.0 = off)")) if bad]
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ---- what a folder holds (read without loading weights) ------------------------------------------------------
@dataclass
class ModelFolder:
    path: str
    kind: Literal["full", "adapter", "quantized", "hub"]
    base: str | None = None  # an adapter's base model
    lora_rank: int | None = None
    merged: list[str] = field(default_factory=list)  # adapters merged into `base` before this one (a chained run)


def inspect_model(path: str) -> ModelFolder:
    folder = Path(path)
    if not folder.exists():
        return ModelFolder(path, "hub")  # local_or_hub let it through as org/name
    if (folder / "adapter_config.json").is_file():
        adapter = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        # The weights it was trained on: for a chained run (SFT on a merged CPT adapter) the run's record, since
        # peft's adapter_config.json names only the raw base.
        base, merged = adapter_base(str(folder))
        if not (Path(base).exists() or base.count("/") == 1):
            raise UserError(f"{folder}/adapter_config.json: its base model {base!r} is not here; edit "
                            "base_model_name_or_path there to where the base model is, or serve a merged export")
        return ModelFolder(path, "adapter", base, adapter.get("r"), merged)
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return ModelFolder(path, "quantized" if config.get("quantization_config") else "full")
    inside = sorted(p.parent.name for p in folder.glob("*/config.json")) + sorted(
        p.parent.name for p in folder.glob("*/adapter_config.json"))
    hint = f"; it has model folders inside: {inside} (e.g. {folder / inside[-1]})" if inside else ""
    raise UserError(f"{folder} is not a model folder: it holds neither config.json (full weights) nor "
                    f"adapter_config.json (a LoRA adapter){hint}. Point --model at a run's final/, an export or a "
                    "model folder.")


def load_inference_tokenizer(folder: ModelFolder, template: Any = None, trust_remote_code: bool = False,
                             need_template: bool = True) -> Any:
    """The folder's tokenizer with the chat template to answer with: the folder's own, or `template`'s
    (a project ChatTemplate the tool loaded from `template_path`), which replaces it."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder.path}: cannot load its tokenizer: {exc}\nGive a run's final/, an export or a model "
                        "folder that holds its tokenizer files.") from None
    if template is not None:
        if tokenizer.chat_template:
            logger.warning("template_path replaces the chat template saved in %s", folder.path)
        template.check_tokenizer(tokenizer)
        template.apply_to_tokenizer(tokenizer)
    elif need_template and not tokenizer.chat_template:
        raise UserError(f"{folder.path} has no chat template (a base model, or a folder saved without one): set "
                        "template_path to the template it was trained with, e.g. "
                        "--template-path self_model/template/qwen2_chatml.json")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # a batch's prompts end together, where generation starts
    return tokenizer


def stop_token_ids(folder: ModelFolder, tokenizer: Any, template: Any = None) -> list[int]:
    """What generation stops on: the template's end-of-turn ids, else the folder's generation_config, else eos."""
    if template is not None:
        ids = template.stop_token_ids(tokenizer)
    else:
        from transformers import GenerationConfig

        try:
            eos = GenerationConfig.from_pretrained(folder.path).eos_token_id
        except OSError:
            eos = None
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id not in ids + [None] else ids


def pick_dtype(name: str) -> torch.dtype | str:
    if name == "auto":
        return "auto" if torch.cuda.is_available() else torch.float32  # CPUs are slow or wrong in half precision
    return getattr(torch, name)


def load_inference_model(folder: ModelFolder, dtype: str = "auto", trust_remote_code: bool = False) -> Any:
    """Full weights as they are; an adapter loaded onto its base and merged (the answers of the trained model,
    at the speed of a plain one)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": pick_dtype(dtype), "trust_remote_code": trust_remote_code}
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    try:
        if folder.kind == "adapter":
            from self_model.core.modeling import attach_adapter

            model = AutoModelForCausalLM.from_pretrained(folder.base, **kwargs)
            for adapter in [*folder.merged, folder.path]:  # the chain in order, as training built it
                model = attach_adapter(model, adapter, trainable=False).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(folder.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder.path}: cannot load the model: {exc}\nGive a run's final/, an export or a model "
                        "folder (config.json + weights); set trust_remote_code: true for models that ship their own "
                        "code.") from None
    return model.eval()


def context_length(config: Any) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


# ---- engines: one interface, two backends ---------------------------------------------------------------------
class TransformersEngine:
    """`model.generate` on batches padded on the left; streaming through `TextIteratorStreamer`."""

    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, stop_ids: list[int] | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.stop_ids = stop_ids or _as_list(model.generation_config.eos_token_id)
        self.context = context_length(model.config)
        self.last_tokens, self.last_seconds = 0, 0.0

    def prompt_ids(self, messages: Messages, tools: list[Any] | None = None) -> list[int]:
        return prompt_ids(self.tokenizer, messages, tools, self.context)

    def generation_config(self, settings: GenerationSettings, longest_prompt: int) -> Any:
        gen = copy.deepcopy(self.model.generation_config)
        room = self.context - longest_prompt if self.context else settings.max_new_tokens
        gen.max_new_tokens, gen.max_length = min(settings.max_new_tokens, room), None
        gen.do_sample = not settings.greedy
        if settings.greedy:  # neutral values: greedy ignores them, and transformers warns about any others
            gen.temperature, gen.top_p, gen.top_k = 1.0, 1.0, 50
        else:  # top_k 0 switches top-k off (transformers skips its warper, vLLM takes -1)
            gen.temperature, gen.top_p, gen.top_k = settings.temperature, settings.top_p, settings.top_k
        gen.repetition_penalty = settings.repetition_penalty
        gen.eos_token_id, gen.pad_token_id = self.stop_ids, self.tokenizer.pad_token_id
        return gen

    def _inputs(self, batch: list[list[int]]) -> dict[str, torch.Tensor]:
        padded = self.tokenizer.pad({"input_ids": batch}, padding=True, return_tensors="pt")
        return {k: v.to(self.model.device) for k, v in padded.items()}

    @torch.no_grad()
    def generate(self, conversations: list[Messages], settings: GenerationSettings, batch_size: int = 8,
                 tools: list[list[Any] | None] | None = None) -> list[str]:
        answers: list[str] = []
        self.last_tokens, start = 0, time.perf_counter()
        for i in range(0, len(conversations), batch_size):
            batch = [self.prompt_ids(m, tools[i + j] if tools else None)
                     for j, m in enumerate(conversations[i:i + batch_size])]
            inputs = self._inputs(batch)
            gen = self.generation_config(settings, max(map(len, batch)))
            out = self.model.generate(**inputs, generation_config=gen)
            for row in out[:, inputs["input_ids"].shape[1]:].tolist():
                reply = _until_stop(row, self.stop_ids)
                self.last_tokens += len(reply)
                answers.append(self.tokenizer.decode(reply, skip_special_tokens=True).strip())
        self.last_seconds = time.perf_counter() - start
        return answers

    def stream(self, messages: Messages, settings: GenerationSettings) -> Iterator[str]:
        """The reply as it is generated, piece by piece (the same `generate` call, with a streamer). Leaving the
        loop early (Ctrl-C in the chat) stops the generation."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        ids = self.prompt_ids(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}
        stop = threading.Event()

        def run() -> None:
            try:
                with torch.no_grad():
                    result["out"] = self.model.generate(
                        **self._inputs([ids]), streamer=streamer, generation_config=self.generation_config(
                            settings, len(ids)), stopping_criteria=StoppingCriteriaList([lambda *_: stop.is_set()]))
            except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread below
                result["error"] = exc
                streamer.end()

        start = time.perf_counter()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            stop.set()
            thread.join()
        if "error" in result:
            raise result["error"]
        self.last_tokens = len(_until_stop(result["out"][0, len(ids):].tolist(), self.stop_ids))
        self.last_seconds = time.perf_counter() - start


# ---- prompts ----------------------------------------------------------------------------------------------------
def prompt_ids(tokenizer: Any, messages: Messages, tools: list[Any] | None = None,
               context: int | None = None) -> list[int]:
    """The prompt as the chat template renders it for generation; a prompt that fills the context is refused."""
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    if context and len(ids) >= context:
        raise RowError(f"the prompt is {len(ids)} tokens, the model's context is {context} "
                       "(max_position_embeddings): shorten it, or drop earlier turns")
    return list(ids)


def generate_answers(model: Any, tokenizer: Any, conversations: list[Messages], settings: GenerationSettings,
                     batch_size: int = 8) -> list[str]:
    """One answer per conversation (each ending with a user turn), batched with left padding. What evaluation
    calls with a model it loaded itself; stop ids come from the model's generation_config."""
    return TransformersEngine(model, tokenizer).generate(conversations, settings, batch_size)


def chat(model: Any, tokenizer: Any, messages: Messages, max_new_tokens: int = 48, do_sample: bool = False,
         folder: str | Path | None = None) -> str:
    """One answer (the SFT run's closing answer): greedy unless `do_sample`; stop ids from `folder`'s
    generation_config when given (a model still in a trainer has its base model's)."""
    stops = stop_token_ids(ModelFolder(str(folder), "full"), tokenizer) if folder else None
    tokenizer.padding_side = "left"
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.7 if do_sample else 0.0)
    return TransformersEngine(model, tokenizer, stops).generate([messages], settings)[0]


def load_for_inference(model_dir: str | Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of a folder (merged when it is an adapter); a plain-text result has no chat template."""
    folder = inspect_model(str(model_dir))
    tokenizer = load_inference_tokenizer(folder, trust_remote_code=trust_remote_code, need_template=False)
    model = load_inference_model(folder, trust_remote_code=trust_remote_code)
    model.generation_config.eos_token_id = stop_token_ids(folder, tokenizer)
    return model, tokenizer


def _as_list(value: Any) -> list[int]:
    return value if isinstance(value, list) else [] if value is None else [value]


def _until_stop(ids: list[int], stops: list[int]) -> list[int]:
    return next((ids[:i] for i, t in enumerate(ids) if t in stops), ids)
