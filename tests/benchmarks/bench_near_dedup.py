"""Near-dedup quality and speed against datasketch, on a synthetic corpus with planted near duplicates.

    uv run python tests/benchmarks/bench_near_dedup.py                     # en and zh; 2k, 5k, 20k base documents
    uv run python tests/benchmarks/bench_near_dedup.py --lang zh --docs 5000 --json bench.json

The corpus: base documents drawn from a Zipf-distributed vocabulary (English-like words, or Han
characters), plus one edited copy of some of them, planted at known Jaccard similarities (the true
Jaccard of the 5-gram shingle sets is measured, not assumed: within 0.025 of the planted level). A copy
at or above the threshold is a duplicate that should be removed; one below must be kept. Each system
sees the same documents in the same order and removes later documents, so precision / recall / F1 are
counted over removed documents.

Systems, all with the same shingles, num_perm and threshold:
  ours                       data_process.dataproc (numpy MinHash in worker processes, our recall-tuned LSH
                             bands, every candidate verified against the threshold by its signature)
  ours, 1 process            the same without worker processes
  datasketch                 as its docs show: MinHashLSH(threshold=...) choosing its own bands x rows,
                             query-then-insert, every candidate it returns removed; one process
  datasketch, verified       the same, but a candidate counts only when m.jaccard(candidate) >= threshold
  datasketch, our bands, verified   our bands x rows and the same verification: the pipeline ours runs
  datasketch, verified, 2p   "datasketch, verified" with the MinHash step spread over the worker processes
An earlier version handed datasketch our recall-tuned bands and removed its candidates unverified, a way it is
not meant to be used (precision 0.70): `--unverified-our-bands` adds that row back for comparison. The speed
columns are per corpus size, so the table shows how cost grows. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import RESULTS, ForeignLoad, machine, write_json  # noqa: E402

from data_process.dataproc.clean import dedup_text  # noqa: E402
from data_process.dataproc.dedup import exact_representatives, near_duplicates  # noqa: E402
from data_process.dataproc.minhash import MinHasher, candidate_bands, optimal_bands  # noqa: E402

LEVELS = (0.3, 0.5, 0.6, 0.7, 0.75, 0.85, 0.9, 0.95, 0.98)


# --- corpus ---------------------------------------------------------------------------------------------


def _shingles(units: list[int], n: int) -> set[tuple[int, ...]]:
    return {tuple(units[i:i + n]) for i in range(max(1, len(units) - n + 1))}


def _jaccard(a: list[int], b: list[int], n: int) -> float:
    sa, sb = _shingles(a, n), _shingles(b, n)
    return len(sa & sb) / len(sa | sb)


def _edited(base: list[int], target: float, n: int, rng: np.random.Generator, vocab: int,
            probs: np.ndarray) -> tuple[list[int], float]:
    """A copy of `base` whose shingle Jaccard with it is as close to `target` as the number of edits allows.

    One fixed random sequence of edits (substitute / insert / delete at random places) is applied to a
    growing prefix, and the prefix length is found by bisection, since Jaccard falls as edits accumulate.
    """
    steps = len(base)
    kinds = rng.integers(0, 3, size=steps)
    places = rng.random(steps)
    tokens = rng.choice(vocab, size=steps, p=probs)

    def apply(m: int) -> list[int]:
        out = list(base)
        for kind, place, token in zip(kinds[:m], places[:m], tokens[:m]):
            i = int(place * len(out))
            if kind == 0 and out:
                out[min(i, len(out) - 1)] = int(token)
            elif kind == 1:
                out.insert(i, int(token))
            elif len(out) > n + 1:
                del out[min(i, len(out) - 1)]
        return out

    lo, hi = 0, steps
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _jaccard(base, apply(mid), n) >= target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda m: abs(_jaccard(base, apply(m), n) - target))
    copy = apply(best)
    return copy, _jaccard(base, copy, n)


def make_corpus(lang: str, docs: int, planted_share: float, ngram: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    if lang == "en":
        vocab = 20_000
        letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
        lengths = rng.integers(2, 10, size=vocab)
        words = sorted({"".join(rng.choice(letters, size=k)) for k in lengths})
        vocab = len(words)
        render = lambda units: " ".join(words[u] for u in units)  # noqa: E731
        size = (150, 400)
    else:
        vocab = 3_500
        render = lambda units: "".join(chr(0x4E00 + u) for u in units)  # noqa: E731
        size = (200, 800)
    probs = 1.0 / (np.arange(vocab) + 10.0) ** 1.1
    probs /= probs.sum()
    bases = [rng.choice(vocab, size=int(rng.integers(*size)), p=probs).tolist() for _ in range(docs)]
    units = list(bases)
    pairs = []  # (base index, copy index, planted level, true Jaccard)
    for k, source in enumerate(rng.choice(docs, size=int(docs * planted_share), replace=False)):
        level = LEVELS[k % len(LEVELS)]
        copy, true = _edited(bases[source], level, ngram, rng, vocab, probs)
        pairs.append((int(source), len(units), level, true))
        units.append(copy)
    order = rng.permutation(len(units))  # copies and bases interleaved
    position = np.empty(len(units), np.int64)
    position[order] = np.arange(len(units))
    texts = [dedup_text(render(units[i])) for i in order]
    pairs = [(int(position[a]), int(position[b]), level, true) for a, b, level, true in pairs]
    return {"texts": texts, "pairs": pairs}


def score(removed: np.ndarray, pairs: list[tuple[int, int, float, float]], threshold: float) -> dict[str, Any]:
    """Precision / recall / F1 over removed documents: the later one of a pair at or above the threshold
    should go; every other document should stay."""
    should = np.zeros(len(removed), dtype=bool)
    for a, b, _, true in pairs:
        if true >= threshold:
            should[max(a, b)] = True
    tp = int((removed & should).sum())
    fp = int((removed & ~should).sum())
    fn = int((~removed & should).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    by_level = {}
    for level in LEVELS:
        later = [max(a, b) for a, b, lvl, _ in pairs if lvl == level]
        by_level[level] = round(float(removed[later].mean()), 3) if later else None
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4), "tp": tp, "fp": fp,
            "fn": fn, "removed_share_by_planted_jaccard": by_level}


# --- systems --------------------------------------------------------------------------------------------


def _ours_signatures(args: tuple[MinHasher, list[str]]) -> np.ndarray:
    return args[0].signatures(args[1])


def run_ours(texts: list[str], a: argparse.Namespace, bands: int, rows: int) -> np.ndarray:
    hasher = MinHasher(a.num_perm, a.ngram, "auto", a.seed)
    chunks = [(hasher, texts[i:i + 2000]) for i in range(0, len(texts), 2000)]
    if a.num_proc > 1:
        with multiprocessing.get_context("fork").Pool(a.num_proc) as pool:
            sig = np.concatenate(pool.map(_ours_signatures, chunks))
    else:
        sig = np.concatenate([_ours_signatures(c) for c in chunks])
    return near_duplicates(sig, np.arange(len(texts)), bands, rows, a.threshold).removed


def _ds_shingles(text: str, n: int, unit: str) -> list[bytes]:
    parts = list(text) if unit == "char" else text.split()
    sep = "" if unit == "char" else " "
    return [sep.join(parts[i:i + n]).encode("utf-8") for i in range(max(1, len(parts) - n + 1))]


def _ds_hashvalues(args: tuple[list[str], int, int, str]) -> np.ndarray:
    from datasketch import MinHash

    texts, n, num_perm, unit = args
    return np.stack([m.hashvalues for m in MinHash.generator((_ds_shingles(t, n, unit) for t in texts),
                                                             num_perm=num_perm, seed=1)])


def run_datasketch(texts: list[str], a: argparse.Namespace, unit: str, params: tuple[int, int] | None,
                   procs: int, verify: bool) -> np.ndarray:
    """params None: datasketch picks bands x rows for the threshold itself. verify: a candidate counts only when
    its estimated Jaccard (`MinHash.jaccard`) reaches the threshold, as its docs suggest for exact filtering."""
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=a.threshold, num_perm=a.num_perm, params=params)
    kept: dict[int, Any] = {}
    removed = np.zeros(len(texts), dtype=bool)
    if procs == 1:
        sketches = MinHash.generator((_ds_shingles(t, a.ngram, unit) for t in texts), num_perm=a.num_perm, seed=1)
    else:
        chunks = [(texts[i:i + 2000], a.ngram, a.num_perm, unit) for i in range(0, len(texts), 2000)]
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            values = np.concatenate(pool.map(_ds_hashvalues, chunks))
        sketches = (LeanMinHash(seed=1, hashvalues=v, scheme="affine32") for v in values)
    for i, m in enumerate(sketches):
        candidates = lsh.query(m)
        if verify:
            candidates = [c for c in candidates if m.jaccard(kept[c]) >= a.threshold]
        if candidates:
            removed[i] = True
        else:
            lsh.insert(i, m)
            if verify:
                kept[i] = m
    return removed


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def bench_exact(texts: list[str]) -> dict[str, Any]:
    """Exact dedup as the pipeline does it: fold case and spacing, 128-bit xxh3, sort the fixed-width keys."""
    import xxhash

    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    start = time.perf_counter()
    keys = np.empty((len(texts), 2), np.uint64)
    for i, t in enumerate(texts):
        d = xxhash.xxh3_128_intdigest(dedup_text(t).encode("utf-8"))
        keys[i] = (d >> 64, d & 0xFFFFFFFFFFFFFFFF)
    exact_representatives(keys)
    seconds = time.perf_counter() - start
    return {"docs_per_s": round(len(texts) / seconds), "mb_per_s": round(megabytes / seconds, 1)}


def bench_pipeline(texts: list[str], a: argparse.Namespace) -> dict[str, Any]:
    """The whole process_data.py run (read, clean, exact + near dedup, split, report) on the corpus as JSONL."""
    from data_process.dataproc.options import ProcessConfig
    from data_process.dataproc.pipeline import run

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.jsonl"
        path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
        cfg = ProcessConfig(input=[str(path)], output_dir=tmp, subdir="out", dedup=True, near_dedup=True,
                            num_perm=a.num_perm, ngram=a.ngram, threshold=a.threshold, num_proc=a.num_proc,
                            min_chars=1, unicode_form="none")
        _, seconds = timed(run, cfg)
    return {"docs_per_s": round(len(texts) / seconds), "seconds": round(seconds, 2)}


def bench_lang(lang: str, docs: int, a: argparse.Namespace) -> dict[str, Any]:
    corpus, gen_s = timed(make_corpus, lang, docs, a.planted, a.ngram, a.seed)
    texts, pairs = corpus["texts"], corpus["pairs"]
    unit = "char" if lang == "zh" else "word"
    bands, rows = candidate_bands(a.threshold, a.num_perm)
    ds_default = optimal_bands(a.threshold, a.num_perm)
    print(f"[{lang}] {len(texts)} documents ({len(pairs)} planted copies) generated in {gen_s:.0f} s; "
          f"bands x rows {bands} x {rows}", file=sys.stderr)
    systems = [("ours", lambda: run_ours(texts, a, bands, rows)),
               ("ours, 1 process", lambda: run_ours(texts, argparse.Namespace(**{**vars(a), "num_proc": 1}),
                                                    bands, rows)),
               (f"datasketch (own {ds_default[0]}x{ds_default[1]})",
                lambda: run_datasketch(texts, a, unit, None, 1, verify=False)),
               ("datasketch, verified", lambda: run_datasketch(texts, a, unit, None, 1, verify=True)),
               ("datasketch, our bands, verified",
                lambda: run_datasketch(texts, a, unit, (bands, rows), 1, verify=True)),
               (f"datasketch, verified, {a.num_proc}p",
                lambda: run_datasketch(texts, a, unit, None, a.num_proc, verify=True))]
    if a.unverified_our_bands:
        systems.append(("datasketch, our bands, unverified (misuse)",
                        lambda: run_datasketch(texts, a, unit, (bands, rows), 1, verify=False)))
    times: dict[str, list[float]] = {name: [] for name, _ in systems}
    foreign: dict[str, list[float]] = {name: [] for name, _ in systems}
    removed = {}
    with ForeignLoad(interval=0.5) as load:
        for _ in range(a.repeat):  # interleaved, so a noisy neighbour slows every system alike
            for name, fn in systems:
                t0 = time.time()
                removed[name], seconds = timed(fn)
                times[name].append(seconds)
                foreign[name].append(load.window(t0, time.time())["foreign_cores"])
    results = {}
    for name, _ in systems:
        median, slowest, fastest = statistics.median(times[name]), max(times[name]), min(times[name])
        results[name] = {"docs_per_s": round(len(texts) / median), "seconds": round(median, 2),
                         "docs_per_s_range": [round(len(texts) / slowest), round(len(texts) / fastest)],
                         "seconds_all": [round(x, 2) for x in times[name]], "foreign_cores": foreign[name],
                         **score(removed[name], pairs, a.threshold)}
        print(f"[{lang}] {name}: {results[name]['docs_per_s']} docs/s, F1 {results[name]['f1']}", file=sys.stderr)
    return {"documents": len(texts), "planted_copies": len(pairs), "unit": unit, "bands": bands, "rows": rows,
            "systems": results, "exact_dedup": bench_exact(texts), "pipeline": bench_pipeline(texts, a)}


def table(lang: str, r: dict[str, Any]) -> str:
    base = r["systems"]["datasketch, verified"]["docs_per_s"]
    lines = [f"### {lang}: {r['documents']} documents, {r['planted_copies']} planted copies, {r['unit']} 5-grams, "
             f"bands x rows {r['bands']} x {r['rows']}", "",
             "| system | precision | recall | F1 | docs/s (median) | min-max | x datasketch verified "
             "| foreign cores |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in r["systems"].items():
        busy = [x for x in s["foreign_cores"] if x is not None]
        low, high = s["docs_per_s_range"]
        lines.append(f"| {name} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {s['docs_per_s']:,} | "
                     f"{low:,}-{high:,} | {s['docs_per_s'] / base:.1f}x | {max(busy, default=0):.2f} |")
    levels = list(LEVELS)
    lines += ["", "Share of planted copies removed, by planted Jaccard level:", "",
              "| system | " + " | ".join(str(x) for x in levels) + " |", "|---|" + "---|" * len(levels)]
    for name, s in r["systems"].items():
        shares = s["removed_share_by_planted_jaccard"]
        lines.append(f"| {name} | " + " | ".join(f"{shares[x]:.2f}" for x in levels) + " |")
    e, p = r["exact_dedup"], r["pipeline"]
    lines += ["", f"Exact dedup (fold, hash, sort; one process): {e['docs_per_s']:,} docs/s, {e['mb_per_s']} MB/s. "
              f"Whole process_data.py run with --dedup --near_dedup: {p['docs_per_s']:,} docs/s.",
              f"Load average (1 min) before / after: {r['load_average'][0]} / {r['load_average'][1]}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lang", choices=["en", "zh", "both"], default="both")
    parser.add_argument("--docs", default="2000,5000,20000", help="base documents per language: one size or several")
    parser.add_argument("--unverified-our-bands", action="store_true",
                        help="add datasketch with our bands and no verification (how the old table misused it)")
    parser.add_argument("--planted", type=float, default=0.2, help="share of base documents given an edited copy")
    parser.add_argument("--num_perm", type=int, default=128)
    parser.add_argument("--ngram", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num_proc", type=int, default=2, help="worker processes (and cores to pin to)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved runs per system (median and min-max shown)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="where to write the results (default tests/benchmarks/results/)")
    a = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > a.num_proc:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: a.num_proc])  # "on N cores" means N cores
    import datasketch

    out = {"machine": {**machine(), "cores_used": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                       else os.cpu_count(), "numpy": np.__version__, "datasketch": datasketch.__version__},
           "params": {k: v for k, v in vars(a).items() if k != "json"}}
    sizes = [int(x) for x in str(a.docs).split(",") if x.strip()]
    for lang in (["en", "zh"] if a.lang == "both" else [a.lang]):
        for docs in sizes:
            load_before = os.getloadavg()[0]
            key = f"{lang}_{docs}"
            out[key] = bench_lang(lang, docs, a)
            # Other processes on the machine skew every number (the 2-process ones most): say how busy it was.
            out[key]["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            print(table(lang, out[key]), flush=True)
    path = write_json(Path(a.json) if a.json else RESULTS / f"near_dedup_{time.strftime('%Y%m%d_%H%M')}.json", out)
    print(f"JSON: {path}")
    return out


if __name__ == "__main__":
    main()
