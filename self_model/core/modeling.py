"""Loading tokenizers and models, LoRA / QLoRA, and choosing the chat template."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from self_model.core.errors import UserError
from self_model.core.lineage import Start, start_of
from self_model.core.stage_config import PeftConfig, StageConfig, mutates_base, wrapped_init_problem

logger = logging.getLogger("self_model")


def load_tokenizer(cfg: StageConfig, model_must_fit: bool = True) -> Any:
    """The run's tokenizer. `model_must_fit`: refuse now, from the model's config.json alone (so --dry-run says it,
    before any weights load), a tokenizer with more tokens than the model has embedding rows; continued pretraining
    passes False because it grows the embeddings."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"tokenizer_name_or_path: cannot load a tokenizer from '{cfg.tokenizer_path}': {exc}\n"
                        "If it needs code from the hub (ChatGLM3, Baichuan2), set trust_remote_code: true.") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any token will do; eos is the convention.
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer has no pad token; using eos %r for padding", tokenizer.eos_token)
    # Whole conversations are tokenized before data.max_length cuts them, so transformers' "Token indices sequence
    # length is longer than the specified maximum ... will result in indexing errors" would be a false alarm on
    # every real data set: the length policy (truncate / drop, reported) decides what reaches the model.
    getattr(tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
    if model_must_fit:
        check_vocab_config(cfg, tokenizer)
    return tokenizer


def check_vocab_config(cfg: StageConfig, tokenizer: Any) -> None:
    """check_vocab before loading: the starting model's config.json gives its embedding rows. A start with LoRA
    adapters is checked after loading instead (an adapter may carry grown embedding rows)."""
    start = start_of(cfg)
    if start.merged or start.adapter:
        return
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(start.model, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        return  # the model load names the problem with its own message
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(text, "vocab_size", None)
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise UserError(
            f"the tokenizer ({cfg.tokenizer_path}) has {len(tokenizer)} tokens but the model {start.model} has "
            f"{rows} embedding rows (config.json vocab_size): they do not belong together. Use the tokenizer saved "
            "with this model, or grow the model first (tokenizer/resize_model.py, or continued pretraining, which "
            "resizes embeddings).")


def weights_dtype(args: Any, peft: PeftConfig) -> torch.dtype:
    """The dtype to load the weights in. bf16: bfloat16. fp16 with LoRA / QLoRA: float16 for the frozen base (half
    the memory; peft keeps the trained adapter in float32) and as QLoRA's compute dtype. fp16 full fine-tuning and
    fp32: float32 (fp16 mixed precision needs float32 master weights)."""
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False) and peft.enabled:
        return torch.float16
    return torch.float32


def pick_precision(training_args: dict[str, Any]) -> torch.dtype:
    """Turn a GPU precision setting into one that works here; returns the dtype to load weights in.

    On a machine without CUDA, fp16/bf16 training is hundreds of times slower (or fails), so a config
    written for a GPU runs in fp32 with a warning instead of crashing.
    """
    if not torch.cuda.is_available():
        wanted = [k for k in ("fp16", "bf16") if training_args.get(k)]
        if wanted:
            logger.warning("training_args.%s: true needs a GPU; no CUDA device here, so this run trains in fp32",
                           "/".join(wanted))
            for key in wanted:
                training_args[key] = False
        # accelerate only sees several CPU processes (torchrun, deepspeed) as a distributed run with use_cpu.
        training_args.setdefault("use_cpu", True)
        return torch.float32
    if training_args.get("bf16"):
        return torch.bfloat16
    return torch.float32  # fp16 mixed precision keeps fp32 master weights


def quantization_config(peft: PeftConfig, compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=peft.quant_type,
                              bnb_4bit_use_double_quant=peft.double_quant, bnb_4bit_compute_dtype=compute_dtype)


def init_deepspeed_comm(args: Any) -> None:
    """Call before loading a model under DeepSpeed. ZeRO-3 partitions the weights while they load
    (`deepspeed.zero.Init`), which needs DeepSpeed's own process group: accelerate starts it on GPUs, but for CPU
    processes it starts only torch's (gloo), and ZeRO-3 would then count one process and fail its batch check."""
    # deepspeed_plugin: `accelerate launch` with a DeepSpeed config (no training_args.deepspeed); world_size starts
    # torch.distributed
    if not (getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None)) or args.world_size <= 1:
        return
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the existing group


def load_causal_lm(cfg: StageConfig, dtype: torch.dtype, model_path: str | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    path = model_path or cfg.model_name_or_path
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.peft.qlora:
        kwargs["quantization_config"] = quantization_config(cfg.peft, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"model_name_or_path: cannot load a causal LM from '{path}': {exc}") from None
    model.config.use_cache = False  # training: a KV cache only costs memory (and disables packed masks)
    if cfg.peft.qlora and not torch.cuda.is_available():
        # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights into an inference-only layout on the first
        # eval-mode forward (evaluation, DPO reference scoring), after which a training forward fails.
        for module in model.modules():
            if getattr(module, "support_avx512bf16_for_cpu", False):
                module.support_avx512bf16_for_cpu = False
    return model


# ---- the starting point: a base model, or a previous run's result (full weights or an adapter) ----------------
def load_start_model(cfg: StageConfig, dtype: torch.dtype, loader: Any = None) -> tuple[Any, Start]:
    """The weights a run starts from (`core.lineage`): `start.model` loaded by `loader` (default `load_causal_lm`,
    4-bit with QLoRA), with the adapters of `start.merged` merged in; `start.adapter`, when set, is the adapter to
    train further (`start_training` puts it on)."""
    start = start_of(cfg)
    if start.merged and cfg.peft.qlora:
        raise UserError(f"peft.qlora: the start {start.describe()} merges a LoRA adapter into the base, which cannot "
                        "be done on 4-bit weights. Export the merged model first (uv run python "
                        "self_model/tools/export_model.py --config config/self_model_config/export.yaml "
                        f"model_name_or_path={start.given_adapter or start.merged[-1]}) and start from that export, "
                        "or set start_adapter: continue to keep training the adapter on the 4-bit base.")
    if start.merged or start.adapter:
        logger.info("starting from %s", start.describe())
    model = (loader or load_causal_lm)(cfg, dtype, start.model)
    for adapter in start.merged:
        model = attach_adapter(model, adapter, trainable=False).merge_and_unload()
    return model, start


def fit_vocab_to_adapter(model: Any, adapter: str) -> None:
    """An adapter trained after vocabulary growth carries the grown embedding rows (`modules_to_save`): give the
    base as many rows before loading it (their values come from the adapter)."""
    from safetensors import safe_open

    weights = Path(adapter) / "adapter_model.safetensors"
    embedding = module_name(model, model.get_input_embeddings())
    if not weights.is_file() or not embedding:
        return
    with safe_open(str(weights), framework="pt") as f:
        rows = [f.get_slice(k).get_shape()[0] for k in f.keys()
                if k.endswith(f"{embedding}.weight") and "lora_" not in k]
    current = model.get_input_embeddings().weight.shape[0]
    if rows and max(rows) != current:
        logger.info("the adapter %s holds %d embedding rows (vocabulary growth); resizing the base from %d",
                    adapter, max(rows), current)
        model.resize_token_embeddings(max(rows), mean_resizing=False)


def attach_adapter(model: Any, adapter: str, trainable: bool) -> Any:
    """peft's PeftModel of `model` + the adapter folder; a mismatch (another base model) is a UserError."""
    from peft import PeftModel

    fit_vocab_to_adapter(model, adapter)
    config = Path(adapter) / "adapter_config.json"
    init = json.loads(config.read_text(encoding="utf-8")).get("init_lora_weights") if config.is_file() else None
    if isinstance(init, str) and mutates_base(init):
        raise UserError(f"{adapter} is a {init} adapter as trained: it belongs on its run's residual base, not on "
                        f"{getattr(model, 'name_or_path', 'the base')}. Use the run's final/ (converted for the "
                        "original base when it was saved); a checkpoint-N/ only resumes its own run.")
    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise UserError(f"cannot load the LoRA adapter {adapter} onto {getattr(model, 'name_or_path', 'the base')}: "
                        f"{str(exc)[:400]}\nIs it an adapter trained on this base model? Point model_name_or_path at "
                        "the adapter's run folder (its base is found from the run) or at the base it was trained "
                        "on.") from None


def start_training(model: Any, start: Start, peft: PeftConfig, gradient_checkpointing: bool = False,
                   task_type: str | None = "CAUSAL_LM") -> Any:
    """The model to train: the starting adapter trained further (start_adapter: continue), else `peft:` applied to
    the starting weights (a new LoRA, or all weights)."""
    if start.adapter is None:
        return upcast_trainable(apply_peft(model, peft, gradient_checkpointing=gradient_checkpointing,
                                           task_type=task_type))
    if peft.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    model = attach_adapter(model, start.adapter, trainable=True)
    warn_if_shape_differs(peft, model.peft_config["default"], start.adapter)
    return upcast_trainable(model)


def upcast_trainable(model: Any) -> Any:
    """Trained weights in float32 when the frozen base was loaded in float16 (`weights_dtype`): fp16 mixed precision
    cannot step float16 parameters (peft upcasts the LoRA matrices itself; full copies in modules_to_save, such as
    grown embeddings, are not)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype == torch.float16:
            param.data = param.data.float()
    return model


def warn_if_shape_differs(peft: PeftConfig, loaded: Any, adapter: str) -> None:
    """peft.lora_* / target_modules do not apply to a continued adapter: say so when they ask for something else."""
    ours = {"lora_r": peft.lora_r, "lora_alpha": peft.lora_alpha, "target_modules": peft.target_modules,
            "use_dora": peft.use_dora, "use_rslora": peft.use_rslora}
    theirs = {"lora_r": loaded.r, "lora_alpha": loaded.lora_alpha, "target_modules": loaded.target_modules,
              "use_dora": loaded.use_dora, "use_rslora": loaded.use_rslora}
    differ = [k for k in ours if (sorted(ours[k]) if isinstance(ours[k], list) else ours[k]) !=
              (sorted(theirs[k]) if isinstance(theirs[k], (list, set)) else theirs[k])]
    if differ:
        logger.warning("peft.%s differ from the starting adapter's %s; training continues %s as it is (set "
                       "start_adapter: merge to merge it and train what peft: says instead)",
                       "/".join(differ), {k: theirs[k] for k in differ}, adapter)


def check_vocab(model: Any, tokenizer: Any) -> None:
    """A tokenizer with more tokens than the model has embedding rows would index out of range."""
    rows = model.get_input_embeddings().num_embeddings  # weight.shape is 0 rows under ZeRO-3 (partitioned)
    if len(tokenizer) > rows:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings have {rows} rows: they do not "
            "belong together. Use the tokenizer saved with this model, or grow the model first "
            "(tokenizer/resize_model.py, or continued pretraining, which resizes embeddings)."
        )


def linear_module_names(model: Any) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    try:
        import bitsandbytes as bnb

        names |= {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    except ImportError:
        pass
    return sorted(names)


def apply_peft(model: Any, peft: PeftConfig, gradient_checkpointing: bool = False,
               task_type: str | None = "CAUSAL_LM") -> Any:
    """Wrap the model with a LoRA adapter (QLoRA when the base is 4-bit); a no-op for full fine-tuning.

    `task_type=None` wraps any model (e.g. a masked LM). When `modules_to_save` holds the input embeddings of a
    model with tied input/output embeddings, peft is asked to keep the two tied (one trained copy, not two).
    """
    if not peft.enabled:
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_target_modules(model, peft)
    if peft.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = lora_config(model, peft, task_type, own_init=True)
    base_path = getattr(model, "name_or_path", "")
    fast_svd = peft.init_lora_weights.startswith("pissa_niter")
    with torch.random.fork_rng(devices=[], enabled=fast_svd):
        if fast_svd:  # its random projection, seeded: a resumed run rebuilds the same residual base
            torch.manual_seed(0)
        model = get_peft_model(model, config)
    if peft.init_lora_weights == "loftq":
        loftq_start(model, base_path)
    if mutates_base(peft.init_lora_weights):
        keep_initial_adapter(model)
    return model


def loftq_start(model: Any, base_path: str) -> None:
    """LoftQ on the 4-bit base: A and B chosen so that Q(W) + BA is closest to the original W, read from the base's
    safetensors (peft's replace_lora_weights_loftq; 4-bit only)."""
    from peft import replace_lora_weights_loftq

    try:
        replace_lora_weights_loftq(model, model_path=base_path if Path(base_path).is_dir() else None)
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise UserError(f"peft.init_lora_weights: loftq reads the base's full-precision weights from its "
                        f"model.safetensors, which failed for {base_path}: {exc}") from None


def keep_initial_adapter(model: Any) -> None:
    """PiSSA / OLoRA: save the adapter as initialised (B0, A0), so `adapter_for_original_base` can convert the trained
    one at the end. Saved with init_lora_weights true: loading it back must not decompose the residual again."""
    config = model.peft_config["default"]
    folder = Path(tempfile.mkdtemp(prefix="self_model_")) / "initial_adapter"
    init, config.init_lora_weights = config.init_lora_weights, True
    model.save_pretrained(str(folder))
    config.init_lora_weights = init
    model.initial_adapter_dir = str(folder)
    weakref.finalize(model, shutil.rmtree, str(folder.parent), True)


def adapter_for_original_base(model: Any, folder: Path) -> None:
    """PiSSA / OLoRA train on a residual base (W - B0 A0): re-save `folder`'s adapter as the plain LoRA of rank 2r,
    [B | -B0] [A ; A0], that gives the trained model on the ORIGINAL base, so merge, export, inference and the next
    stage load it onto the base they know (peft's path_initial_model_for_weight_conversion). Others: nothing to do."""
    initial = getattr(model, "initial_adapter_dir", None)
    if initial:
        model.save_pretrained(str(folder), path_initial_model_for_weight_conversion=initial)


def check_target_modules(model: Any, peft: PeftConfig) -> None:
    if isinstance(peft.target_modules, list):
        available = linear_module_names(model)
        missing = [m for m in peft.target_modules if m not in available]
        if missing:
            raise UserError(f"peft.target_modules: {missing} are not linear layers of this model; "
                            f"available: {available} (or use all-linear)")


def lora_config(model: Any, peft: PeftConfig, task_type: str | None = "CAUSAL_LM", own_init: bool = False) -> Any:
    """The peft `LoraConfig` for the `peft:` section (for trainers that wrap the model themselves, like trl's)."""
    from peft import LoraConfig

    init = peft.init_lora_weights
    if not own_init and (problem := wrapped_init_problem(peft)):
        raise UserError(problem)
    extra: dict[str, Any] = {}
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    embedding = module_name(model, model.get_input_embeddings()).rsplit(".", 1)[-1]
    if tied and any(m.rsplit(".", 1)[-1] == embedding for m in peft.modules_to_save or []) and \
            "ensure_weight_tying" in LoraConfig.__dataclass_fields__:
        extra["ensure_weight_tying"] = True
    return LoraConfig(r=peft.lora_r, lora_alpha=peft.lora_alpha, lora_dropout=peft.lora_dropout,
                      target_modules=peft.target_modules, task_type=task_type, **extra, use_dora=peft.use_dora,
                      use_rslora=peft.use_rslora, init_lora_weights=True if init in ("default", "loftq") else init,
                      modules_to_save=list(peft.modules_to_save) if peft.modules_to_save else None)


def module_name(model: Any, module: Any) -> str:
    """The dotted name of `module` inside `model` ('' when it is not there)."""
    return next((name for name, mod in model.named_modules() if mod is module), "")


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", None) or param.numel()  # ZeRO-3 leaves 0 elements on each process
        if param.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total

