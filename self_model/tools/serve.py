"""Serve a trained model over the OpenAI API: /v1/chat/completions, streaming and not.

    uv run --extra serve python self_model/tools/serve.py --model self_model/checkpoints/finetune/final
    uv run --extra vllm python self_model/tools/serve.py --model outputs/my-sft/final backend=vllm   # CUDA GPU
    uv run --extra serve python self_model/tools/serve.py --model ... --dry-run    # print the server command

On a CUDA GPU with vLLM installed (backend auto or vllm) this runs `vllm serve`; elsewhere `transformers serve`,
the OpenAI-compatible server transformers ships (the `serve` extra installs its FastAPI and uvicorn). Both render
prompts with the chat template saved in the folder and stop on its generation_config's ids. For transformers, an
adapter is merged into its base in a temporary folder (vLLM serves it as a LoRA module), and `template_path` is
written into a temporary copy of the folder. Sampling comes with each request (temperature 0 = greedy); the
`generation:` keys of the YAML are for chat.py and generate.py. Any OpenAI client talks to it:

    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none").chat.completions.create(
        model="<the name printed at start>", messages=[{"role": "user", "content": "..."}])
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from self_model.core.cli import run_main
from self_model.core.errors import UserError
from self_model.core.inference import (
    ModelFolder,
    inspect_model,
    load_inference_model,
    load_inference_tokenizer,
    stop_token_ids,
)
from self_model.template.chat_template import load_template
from self_model.tools.generate import InferenceConfig, choose_backend, inference_argv, lora_rank_slot

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "self_model_config" / "inference.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


def served_name(folder: ModelFolder) -> str:
    """The model name requests use: the run's name for a run's final/, else the folder's name."""
    path = Path(folder.path).resolve()
    return path.parent.name if path.name == "final" else path.name


def served_folder(cfg: InferenceConfig, folder: ModelFolder, template: Any, tmp: Path, write: bool) -> Path:
    """`tmp/<name>`, the folder `transformers serve` loads (run in `tmp`, so requests name the model `<name>`): a link
    to the model folder when it holds full weights and its own chat template; else a folder with the merged adapter
    (or links to the weights) and the template written."""
    if folder.kind == "hub":
        if template is not None:
            raise UserError(f"{folder.path}: template_path needs the model on disk; download it first "
                            f"(hf download {folder.path} --local-dir <folder>) and serve that folder")
        return Path(folder.path)  # transformers serve loads the hub id itself; requests name the id
    out = tmp / served_name(folder)
    if not write:
        return out
    if folder.kind != "adapter" and template is None:
        out.symlink_to(Path(folder.path).resolve(), target_is_directory=True)
        return out
    out.mkdir()
    tokenizer = load_inference_tokenizer(folder, template, cfg.trust_remote_code)
    if folder.kind == "adapter":
        merged = load_inference_model(folder, cfg.dtype, cfg.trust_remote_code)  # the base with the adapter in it
        merged.save_pretrained(out)
    else:
        for item in Path(folder.path).iterdir():
            if item.name not in TOKENIZER_FILES:
                (out / item.name).symlink_to(item.resolve())
    tokenizer.save_pretrained(out)
    write_generation_config(folder, tokenizer, template, out)
    return out


def write_generation_config(folder: ModelFolder, tokenizer: Any, template: Any, out: Path) -> None:
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(folder.path)
    except OSError:
        gen = GenerationConfig()
    gen.eos_token_id, gen.pad_token_id = stop_token_ids(folder, tokenizer, template), tokenizer.pad_token_id
    gen.save_pretrained(out)


def transformers_command(cfg: InferenceConfig, folder: ModelFolder, template: Any, tmp: Path,
                         write: bool) -> tuple[list[str], str]:
    if not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "openai")):
        raise UserError("the CPU server is `transformers serve`, which needs FastAPI, uvicorn and openai: install "
                        "the serve extra (uv sync --extra serve), or run with uv run --extra serve ...")
    served = served_folder(cfg, folder, template, tmp, write)
    name = str(served) if folder.kind == "hub" else served.name
    dtype = "float32" if cfg.dtype == "auto" and not torch.cuda.is_available() else cfg.dtype
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", name, "--host", cfg.server.host,
           "--port", str(cfg.server.port), "--device", "auto" if torch.cuda.is_available() else "cpu",
           "--dtype", dtype, "--log-level", "info"]
    return cmd + (["--trust-remote-code"] if cfg.trust_remote_code else []), name


def vllm_command(cfg: InferenceConfig, folder: ModelFolder, template: Any, tmp: Path,
                 write: bool) -> tuple[list[str], str]:
    name = served_name(folder)
    vllm = Path(sys.executable).with_name("vllm")  # the console script beside this interpreter
    cmd = [str(vllm) if vllm.exists() else "vllm", "serve", folder.base or folder.path, "--host", cfg.server.host,
           "--port", str(cfg.server.port), "--tokenizer", folder.path, "--generation-config", folder.path,
           "--seed", str(cfg.generation.seed)]
    if folder.kind == "adapter":
        cmd += ["--enable-lora", "--lora-modules", f"{name}={folder.path}", "--max-lora-rank",
                str(lora_rank_slot(folder.lora_rank)), "--served-model-name", f"{name}-base"]
    else:
        cmd += ["--served-model-name", name]
    if template is not None:
        (tmp / "chat_template.jinja").write_text(template.to_jinja(), encoding="utf-8")
        if write:
            tokenizer = load_inference_tokenizer(folder, template, cfg.trust_remote_code)
            write_generation_config(folder, tokenizer, template, tmp)
        cmd += ["--chat-template", str(tmp / "chat_template.jinja"), "--generation-config", str(tmp)]
    for key, value in cfg.vllm_args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + flag[2:])
        else:
            cmd += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return cmd + (["--trust-remote-code"] if cfg.trust_remote_code else []), name


def run_server(cmd: list[str], cwd: Path | None) -> int:
    """Run the server in the foreground until it exits, Ctrl-C or SIGTERM (both stop it cleanly)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, "HF_HUB_DISABLE_UPDATE_CHECK": "1"})
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # the server got the same Ctrl-C
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return code


def main(cfg: InferenceConfig, dry_run: bool = False) -> None:
    template = load_template(cfg.template_path) if cfg.template_path else None
    folder, backend = inspect_model(cfg.model_name_or_path), choose_backend(cfg.backend)
    load_inference_tokenizer(folder, template, cfg.trust_remote_code)  # no chat template: said now, not later
    build = vllm_command if backend == "vllm" else transformers_command
    with tempfile.TemporaryDirectory(prefix="self_model_serve_") as tmp:
        cmd, name = build(cfg, folder, template, Path(tmp), not dry_run)
        if dry_run:
            print(shlex.join(cmd))
            return
        print(f"serving {folder.path} ({folder.kind}) with {backend} at http://{cfg.server.host}:{cfg.server.port}/v1"
              f"\nrequests name the model {name!r}; Ctrl-C stops the server", flush=True)
        code = run_server(cmd, Path(tmp) if backend == "transformers" else None)
    if code not in (0, -signal.SIGTERM, -signal.SIGINT, 130):
        raise UserError(f"the server stopped with exit code {code} (its messages are above)")


if __name__ == "__main__":
    run_main(main, InferenceConfig, __doc__, inference_argv(sys.argv[1:], DEFAULT_CONFIG))
