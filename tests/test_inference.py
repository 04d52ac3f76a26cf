"""Chat CLI, batch generation and the OpenAI-compatible server on the tiny model; bad inputs; vLLM on a GPU.

Two model folders: an "export" (full weights and a saved chat template; the tiny model with an untied random
LM head, so greedy answers are varied gibberish rather than one repeated token) and a real SFT run's final/
(a LoRA adapter on that export). Every answer is compared under greedy decoding, where equal means the same code.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, SAMPLE_DIR, free_port

from self_model.core.cli import run_main
from self_model.core.errors import UserError
from self_model.core.inference import GenerationSettings, chat, generate_answers, load_for_inference
from self_model.tools import chat as chat_tool
from self_model.tools import generate as generate_tool
from self_model.tools import serve as serve_tool
from self_model.tools.generate import InferenceConfig, choose_backend, inference_argv, load_engine

CHATML = ROOT / "self_model" / "template" / "qwen2_chatml.json"
GREEDY = GenerationSettings(max_new_tokens=16, temperature=0.0)
GREEDY_ARGS = ["generation.temperature=0", "generation.max_new_tokens=16"]
Q1, Q2 = "发烧怎么办？", "需要去医院吗？"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """The tiny model gains nothing from a second thread, and on CPU cores shared with other work torch's threads
    wait for each other (generation runs ten times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def export_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full-weights folder with its chat template and stop ids, as an export writes it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from self_model.core.run import save_generation_config
    from self_model.template.chat_template import load_template

    out = tmp_path_factory.mktemp("export") / "tiny_chat"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.tie_word_embeddings = False
    gen = torch.Generator().manual_seed(0)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=gen) * 0.5)
    tokenizer, template = AutoTokenizer.from_pretrained(tiny_model_dir), load_template(CHATML)
    template.apply_to_tokenizer(tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_generation_config(model, tokenizer, template, out)
    return out


@pytest.fixture(scope="module")
def run_final(export_dir: Path, finetune_yaml: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real SFT run's final/: a LoRA adapter, its tokenizer, chat template and generation config."""
    from self_model.core.config import load_config
    from self_model.fine_tuning.config import FinetuneConfig
    from self_model.fine_tuning.train_finetune import main

    data = copy.deepcopy(finetune_yaml)
    data.update(model_name_or_path=str(export_dir), tokenizer_name_or_path=str(export_dir), template_path=str(CHATML))
    data["data"].update(train_file=str(SAMPLE_DIR / "sft_train.jsonl"), eval_file=str(SAMPLE_DIR / "sft_eval.jsonl"))
    data["training_args"].update(output_dir=str(tmp_path_factory.mktemp("sft") / "my-sft"), max_steps=2,
                                 logging_steps=1, save_steps=2, eval_steps=2, per_device_train_batch_size=4,
                                 gradient_accumulation_steps=1, disable_tqdm=True, learning_rate=5.0e-3)
    final = main(load_config(FinetuneConfig, None, [], data=data))
    assert (final / "adapter_config.json").is_file() and (final / "chat_template.jinja").is_file()
    return final


@pytest.fixture(scope="module")
def run_engine(run_final: Path) -> Any:
    return load_engine(InferenceConfig(str(run_final), backend="transformers"))


def tool(module: Any, argv: list[str]) -> int:
    """A tool's command line, in-process: its exit code (0, or what run_main exits with)."""
    try:
        run_main(module.main, InferenceConfig, module.__doc__, inference_argv(argv, module.DEFAULT_CONFIG))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


# ---- chat ------------------------------------------------------------------------------------------------------
def test_chat_cli_streams_multi_turn_through_stdin(run_final: Path, run_engine: Any, monkeypatch: Any,
                                                  capsys: Any) -> None:
    system = {"role": "system", "content": "你是医生"}
    # Two turns, /clear, the first question again, then the end of input (which ends the chat like /exit).
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{Q1}\n{Q2}\n/clear\n{Q1}\n"))
    assert tool(chat_tool, ["--model", str(run_final), "--system", system["content"], *GREEDY_ARGS]) == 0
    out, err = capsys.readouterr()
    streamed = [part.split("\nuser> ")[0].strip() for part in out.split("assistant> ")[1:]]
    first = run_engine.generate([[system, {"role": "user", "content": Q1}]], GREEDY)[0]
    second = run_engine.generate([[system, {"role": "user", "content": Q1}, {"role": "assistant", "content": first},
                                   {"role": "user", "content": Q2}]], GREEDY)[0]
    assert first and first != second
    assert streamed == [first, second, first]  # history kept, then forgotten by /clear
    assert "(conversation cleared)" in out and err.count("tokens/s)") == 3


def test_chat_streams_piece_by_piece(run_engine: Any) -> None:
    pieces = list(run_engine.stream([{"role": "user", "content": Q2}], GREEDY))
    assert len([p for p in pieces if p]) > 3  # token by token, not one block at the end


def test_stream_equals_the_batch_answer_and_the_sft_closing_answer(run_final: Path, run_engine: Any) -> None:
    messages = [{"role": "user", "content": Q1}]
    answer = run_engine.generate([messages], GREEDY)[0]
    assert "".join(run_engine.stream(messages, GREEDY)).strip() == answer
    assert run_engine.last_tokens == 16 or answer  # counted until the stop id
    # The SFT run's closing answer: the same engine, stop ids from final/'s generation_config.
    model, tokenizer = load_for_inference(run_final)
    assert chat(model, tokenizer, messages, max_new_tokens=16, folder=run_final) == answer
    assert generate_answers(model, tokenizer, [messages], GREEDY) == [answer]


def test_folder_without_chat_template_needs_template_path(tiny_model_dir: Path, capsys: Any) -> None:
    assert tool(chat_tool, ["--model", str(tiny_model_dir), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "has no chat template" in err and "--template-path self_model/template/" in err
    assert tool(chat_tool, ["--model", str(tiny_model_dir), "--template-path", str(CHATML), "--dry-run"]) == 0
    from self_model.template.chat_template import load_template

    template = load_template(CHATML)
    engine = load_engine(InferenceConfig(str(tiny_model_dir), backend="transformers"), template)
    assert engine.stop_ids == template.stop_token_ids(engine.tokenizer)  # <|im_end|> and eos
    assert "<|im_start|>assistant" in engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                          tokenize=False, add_generation_prompt=True)


# ---- batch generation --------------------------------------------------------------------------------------------
def test_generate_batches_resumes_and_keeps_references(run_final: Path, run_engine: Any, tmp_path: Path,
                                                       capsys: Any) -> None:
    questions = [Q1, Q2, "头痛应该吃什么药，需要注意什么？请详细说明", "hi", "如何预防感冒？"]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in questions])
    out = tmp_path / "answers.jsonl"
    argv = ["--model", str(run_final), "--input", str(prompts), "--output", str(out), "batch.batch_size=2",
            *GREEDY_ARGS]
    assert tool(generate_tool, argv) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    singles = [run_engine.generate([[{"role": "user", "content": q}]], GREEDY)[0] for q in questions]
    assert [r["answer"] for r in rows] == singles  # left-padded batches answer as one prompt at a time
    assert [r["source"] for r in rows] == [f"{prompts}:{i}" for i in range(1, 6)]
    assert len(set(singles)) > 1

    # Interrupted after two rows and half of the third: the rerun keeps those two and answers the other three.
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:20], encoding="utf-8")
    capsys.readouterr()
    assert tool(generate_tool, argv) == 0
    assert out.read_text(encoding="utf-8").splitlines(keepends=True) == lines
    assert "3 answers written" in capsys.readouterr().out
    assert tool(generate_tool, argv) == 0 and "all 5 prompts are already answered" in capsys.readouterr().out

    # A chat-format file: the last assistant turn is the reference, not part of the prompt.
    out2 = tmp_path / "eval_answers.jsonl"
    assert tool(generate_tool, ["--model", str(run_final), "--input", str(SAMPLE_DIR / "sft_eval.jsonl"),
                                "--output", str(out2), *GREEDY_ARGS, "generation.max_new_tokens=4"]) == 0
    first = json.loads(out2.read_text(encoding="utf-8").splitlines()[0])
    source = json.loads((SAMPLE_DIR / "sft_eval.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first["messages"] == [{"role": "user", "content": source["conversations"][0]["value"]}]
    assert first["reference"] == source["conversations"][1]["value"]


def test_bad_rows_and_long_prompts_are_named_and_nothing_is_written(run_final: Path, tmp_path: Path,
                                                                    capsys: Any) -> None:
    prompts = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": Q1}, {"question": "?"}, "{not json",
                                                   {"prompt": "发烧" * 3000}])
    out = tmp_path / "answers.jsonl"
    assert tool(generate_tool, ["--model", str(run_final), "--input", str(prompts), "--output", str(out)]) == 3
    err = capsys.readouterr().err
    assert f"{prompts}:2: unrecognised row" in err and '"prompt": "..."' in err
    assert f"{prompts}:3: malformed JSON" in err
    assert f"{prompts}:4: the prompt is" in err and "context is 2048" in err
    assert not out.exists()


def test_output_of_another_input_is_refused(run_final: Path, tmp_path: Path, capsys: Any) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": Q1}])
    out = write_jsonl(tmp_path / "answers.jsonl", [{"source": "other.jsonl:7", "answer": "x"}])
    assert tool(generate_tool, ["--model", str(run_final), "--input", str(prompts), "--output", str(out)]) == 1
    assert "belongs to another input" in capsys.readouterr().err


def test_not_a_model_folder(tmp_path: Path, run_final: Path, capsys: Any) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": Q1}])
    for folder in (tmp_path, run_final.parent):
        out = tmp_path / "answers.jsonl"
        assert tool(generate_tool, ["--model", str(folder), "--input", str(prompts), "--output", str(out)]) == 1
        err = capsys.readouterr().err
        assert "is not a model folder" in err and not out.exists()
    assert "final" in err  # a run folder: the model folder inside is named


def test_vllm_without_gpu_is_refused(run_final: Path, tmp_path: Path, capsys: Any) -> None:
    if torch.cuda.is_available() and choose_backend("auto") == "vllm":
        pytest.skip("vLLM and a GPU are here")
    with pytest.raises(UserError, match="backend: vllm needs"):
        choose_backend("vllm")
    assert choose_backend("auto") == "transformers"
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": Q1}])
    out = tmp_path / "answers.jsonl"
    argv = ["--model", str(run_final), "--input", str(prompts), "--output", str(out), "--backend", "vllm"]
    assert tool(generate_tool, argv) == 1 and not out.exists()
    assert "backend: transformers" in capsys.readouterr().err


def test_shipped_yaml_loads_and_dry_runs(export_dir: Path, capsys: Any) -> None:
    assert tool(generate_tool, ["--config", "config/self_model_config/inference.yaml",
                                f"model_name_or_path={export_dir}", "--dry-run"]) == 0
    assert "would answer" in capsys.readouterr().out
    assert tool(chat_tool, ["--model", str(export_dir), "generation.top_p=2", "--dry-run"]) == 2
    assert "generation.top_p must be in (0, 1]" in capsys.readouterr().err


# ---- the OpenAI-compatible server ------------------------------------------------------------------------------
@contextlib.contextmanager
def served(folder: Path) -> Iterator[tuple[int, subprocess.Popen]]:
    """serve.py on 127.0.0.1 at a free port, up (health check) within 120 s; stopped and checked afterwards."""
    for module in ("fastapi", "uvicorn", "openai"):
        pytest.importorskip(module, reason="the server needs the serve extra (uv sync --extra serve)")
    port = free_port()
    server = subprocess.Popen([sys.executable, "self_model/tools/serve.py", "--model", str(folder),
                               f"server.port={port}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the server did not come up:\n{server.stdout.read() if server.stdout else ''}")
                time.sleep(0.5)
        yield int(port), server
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert server.returncode == 0


def test_server_answers_the_openai_client_like_the_cli(run_final: Path, run_engine: Any, capsys: Any) -> None:
    from openai import OpenAI

    assert tool(serve_tool, ["--model", str(run_final), "--dry-run"]) == 0
    assert "transformers.cli.transformers serve my-sft" in capsys.readouterr().out
    with served(run_final) as (port, _):
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=60)
        for question in (Q1, Q2):
            messages = [{"role": "user", "content": question}]
            expected = run_engine.generate([messages], GREEDY)[0]
            reply = client.chat.completions.create(model="my-sft", messages=messages, temperature=0, max_tokens=16)
            assert reply.choices[0].message.content.strip() == expected
            stream = client.chat.completions.create(model="my-sft", messages=messages, temperature=0, max_tokens=16,
                                                    stream=True)
            streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip()
            # The server's incremental decoder holds back a character cut in half by max_tokens ('\ufffd').
            assert streamed == expected.removesuffix("\ufffd").strip()


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (transformers serve may fork), from /proc."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        try:
            status = (proc / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if proc.name == str(pid) or fields.get("PPid", "").strip() == str(pid):
            total += int(fields.get("VmRSS", "0 kB").split()[0]) / 1024
    return total


def test_server_under_load_answers_every_streaming_client(run_final: Path, run_engine: Any) -> None:
    """32 concurrent streaming clients (127.0.0.1 only, bounded in count and time): every answer complete and the
    greedy answer, none lost, the server's memory bounded."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    questions = [Q1, Q2] * 16
    expected = {q: run_engine.generate([[{"role": "user", "content": q}]], GREEDY)[0] for q in (Q1, Q2)}
    with served(run_final) as (port, server):
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120, max_retries=0)
        before = rss_mib(server.pid)

        def ask(question: str) -> tuple[str, str | None]:
            stream = client.chat.completions.create(model="my-sft", messages=[{"role": "user", "content": question}],
                                                    temperature=0, max_tokens=16, stream=True)
            text, finish = "", None
            for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
            return text.strip(), finish

        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=32) as pool:
            answers = list(pool.map(ask, questions, timeout=240))
        elapsed = time.monotonic() - start
        after = rss_mib(server.pid)
    assert len(answers) == 32 and all(finish in ("stop", "length") for _, finish in answers)
    for question, (text, _) in zip(questions, answers):
        assert text == expected[question].removesuffix("\ufffd").strip()
    assert elapsed < 240 and after - before < 1024, f"{elapsed:.0f} s, memory {before:.0f} -> {after:.0f} MiB"


# ---- vLLM (GPU) ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("which", ["export", "adapter"])
def test_vllm_answers_like_transformers(which: str, export_dir: Path, run_final: Path) -> None:
    pytest.importorskip("vllm", reason="needs the vllm extra")
    folder = str(export_dir if which == "export" else run_final)
    settings = GenerationSettings(max_new_tokens=8, temperature=0.0)
    questions = [[{"role": "user", "content": q}] for q in (Q1, Q2)]
    expected = load_engine(InferenceConfig(folder, backend="transformers", dtype="float32")).generate(questions,
                                                                                                   settings)
    engine = load_engine(InferenceConfig(folder, backend="vllm", dtype="float32",
                                         vllm_args={"gpu_memory_utilization": 0.3, "enforce_eager": True}))
    assert engine.name == "vllm"
    assert engine.generate(questions, settings) == expected


def test_quantized_folder_answers(export_dir: Path, tmp_path: Path) -> None:
    """A 4-bit (bitsandbytes NF4) export: the quantization is read from its config.json."""
    import shutil

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantized = tmp_path / "tiny_chat_nf4"
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32, quantization_config=(
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)))
    model.save_pretrained(quantized)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(export_dir / name, quantized / name)
    engine = load_engine(InferenceConfig(str(quantized), backend="transformers"))
    assert engine.model.config.quantization_config.load_in_4bit
    assert engine.generate([[{"role": "user", "content": Q1}]], GREEDY)[0]


def test_served_folder_carries_template_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    """transformers serve reads the chat template and stop ids from the folder: template_path is written into a
    copy whose weights are links to the original."""
    from transformers import AutoTokenizer, GenerationConfig

    from self_model.core.inference import inspect_model
    from self_model.template.chat_template import load_template

    cfg = InferenceConfig(str(tiny_model_dir), template_path=str(CHATML))
    template = load_template(CHATML)
    served = serve_tool.served_folder(cfg, inspect_model(str(tiny_model_dir)), template, tmp_path, write=True)
    assert served == tmp_path / tiny_model_dir.name and (served / "model.safetensors").is_symlink()
    tokenizer = AutoTokenizer.from_pretrained(served)
    assert tokenizer.chat_template == template.to_jinja()
    eos = GenerationConfig.from_pretrained(served).eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos and tokenizer.eos_token_id in eos
    assert not AutoTokenizer.from_pretrained(tiny_model_dir).chat_template  # the original is untouched
