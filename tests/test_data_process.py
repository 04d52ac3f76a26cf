"""process_data.py: each input format normalizes, outputs feed the trainers, the report adds up, bad input is named."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from data_process.dataproc.clean import clean_text, script_ratio
from data_process.dataproc.options import ProcessConfig, load_process_config
from data_process.dataproc.pipeline import run
from self_model.core.config import load_config
from self_model.core.conversations import load_conversations
from self_model.core.errors import ConfigError, DataError, UserError

ROOT = Path(__file__).resolve().parents[1]
MEDICALGPT = Path(__file__).resolve().parents[2] / "shared" / "data" / "medicalgpt"
USER_Q = "感冒了应该多喝水吗？"
ANSWER = "是的，感冒时多喝温水有助于补充体液。"


@pytest.fixture
def medicalgpt() -> Path:
    if not MEDICALGPT.is_dir():
        pytest.skip(f"{MEDICALGPT} is absent (it ships with the development checkout only)")
    return MEDICALGPT


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def process(tmp_path: Path, inputs: list[Path], **options: Any) -> tuple[dict[str, Any], Path]:
    data = {"input": [str(p) for p in inputs], "output_dir": str(tmp_path / "out"), "subdir": "s", "num_proc": 1,
            "val_ratio": 0.0, "min_chars": 1, **options}
    cfg = load_config(ProcessConfig, None, data=data)
    return run(cfg), cfg.out_dir


def all_rows(out: Path) -> list[dict[str, Any]]:
    rows = read_jsonl(out / "train.jsonl")
    return rows + (read_jsonl(out / "validation.jsonl") if (out / "validation.jsonl").exists() else [])


CHAT = [{"role": "user", "content": USER_Q}, {"role": "assistant", "content": ANSWER}]
FORMAT_CASES = {
    "text": ({"text": "  第一行  \n\n\n\n第二行\u200b "}, {"text": "第一行\n\n第二行"}),
    "sharegpt": ({"conversations": [{"from": "human", "value": USER_Q}, {"from": "gpt", "value": ANSWER}]},
                 {"messages": CHAT}),
    "messages": ({"messages": [{"role": "system", "content": "你是医生。"}, *CHAT]},
                 {"messages": [{"role": "system", "content": "你是医生。"}, *CHAT]}),
    "alpaca": ({"instruction": "回答问题", "input": USER_Q, "output": ANSWER},
               {"messages": [{"role": "user", "content": f"回答问题\n{USER_Q}"}, CHAT[1]]}),
    "preference": ({"conversations": [{"from": "human", "value": USER_Q}], "chosen": ANSWER, "rejected": "不用。"},
                   {"messages": [CHAT[0]], "chosen": ANSWER, "rejected": "不用。"}),
    "preference_prompt": ({"prompt": USER_Q, "chosen": ANSWER, "rejected": "不用。"},
                          {"messages": [CHAT[0]], "chosen": ANSWER, "rejected": "不用。"}),
    "preference_hh": ({"chosen": CHAT, "rejected": [CHAT[0], {"role": "assistant", "content": "不用。"}]},
                      {"messages": [CHAT[0]], "chosen": ANSWER, "rejected": "不用。"}),
    "qa": ({"question": USER_Q, "answer": "是"}, {"question": USER_Q, "answer": "是"}),
}


@pytest.mark.parametrize("name", list(FORMAT_CASES))
def test_each_format_normalizes_to_its_canonical_record(tmp_path: Path, name: str) -> None:
    row, expected = FORMAT_CASES[name]
    report, out = process(tmp_path, [write_jsonl(tmp_path / "in.jsonl", [row])], unicode_form="none")
    assert read_jsonl(out / "train.jsonl") == [expected]
    assert report["inputs"][0]["format"] == name.split("_")[0]


def test_csv_parquet_json_and_txt_inputs(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": f"问题{i}是什么", "answer": f"答案{i}"} for i in range(3)]
    with open(tmp_path / "a.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
    (tmp_path / "c.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    for name in ("a.csv", "b.parquet", "c.json"):
        _, out = process(tmp_path / name.split(".")[0], [tmp_path / name])
        assert read_jsonl(out / "train.jsonl") == rows, name
    (tmp_path / "d.txt").write_text("第一段文字。\n\n第二段文字。\n", encoding="utf-8")
    report, out = process(tmp_path / "d", [tmp_path / "d.txt"])
    assert read_jsonl(out / "train.jsonl") == [{"text": "第一段文字。"}, {"text": "第二段文字。"}]
    assert report["inputs"][0]["blank_lines"] == 1


def test_shared_medicalgpt_files_normalize_and_feed_the_trainers(tmp_path: Path, medicalgpt: Path) -> None:
    expected = {"medical_sft_1K_format.jsonl": ("sharegpt", "sft", 1000), "dpo_zh_500.jsonl": ("preference",
                "preference", 500), "grpo_sample.jsonl": ("qa", "qa", 32), "fever.txt": ("text", "text", 985)}
    for name, (fmt, kind, rows) in expected.items():
        report, out = process(tmp_path / name, [medicalgpt / name], val_ratio=0.1)
        assert (report["inputs"][0]["format"], report["kind"], report["rows_in"]) == (fmt, kind, rows)
        kept = all_rows(out)
        assert len(kept) == report["rows_out"] > 0.9 * rows
        files = [out / "train.jsonl", out / "validation.jsonl"]
        if kind == "sft":
            assert len(load_conversations([str(f) for f in files])) == len(kept)
        elif kind == "preference":
            from self_model.core.preferences import load_preference_pairs

            pairs, identical = load_preference_pairs([str(f) for f in files])
            assert len(pairs) == len(kept) and not identical
        elif kind == "text":
            from self_model.core.corpus import CorpusStats, iter_documents

            assert len(list(iter_documents(files, ["text"], CorpusStats()))) == len(kept)
        key_sets = {frozenset(r) for r in kept}
        assert key_sets == {frozenset({"sft": ["messages"], "preference": ["messages", "chosen", "rejected"],
                                       "qa": ["question", "answer"], "text": ["text"]}[kind])}
    dpo = read_jsonl(tmp_path / "dpo_zh_500.jsonl" / "out" / "s" / "train.jsonl")
    assert all(r["messages"][-1]["role"] == "user" and r["chosen"] and r["rejected"] for r in dpo)
    assert any(r["messages"][0]["role"] == "system" for r in dpo)  # 84 rows carry a system turn


def test_sft_output_loads_in_the_finetune_loader(tmp_path: Path) -> None:
    sample = ROOT / "data_process" / "sample_data"
    report, out = process(tmp_path, [sample / "sft_train.jsonl", sample / "sft_alpaca.jsonl",
                                     sample / "sft_messages.jsonl"], val_ratio=0.1, dedup=True, near_dedup=True)
    samples = load_conversations([str(out / "train.jsonl"), str(out / "validation.jsonl")])
    assert len(samples) == report["rows_out"] == report["rows_in"] - sum(
        sum(s["removed"].values()) for s in report["steps"] if "removed" in s)


def test_cleaning_rules() -> None:
    cfg = ProcessConfig()
    assert clean_text("ｆｕｌｌ\u3000width，", ProcessConfig(unicode_form="NFKC")) == "full width,"  # NFKC
    assert clean_text("a\x00b\x1bc\ufeffd\u200be", cfg) == "abcde"
    assert clean_text("def f():\r\n    return 1   \r\n\r\n\r\n\r\nx", cfg) == "def f():\n    return 1\n\nx"
    assert clean_text("ｆｕｌｌ，", ProcessConfig(unicode_form="NFC")) == "ｆｕｌｌ，"
    assert script_ratio("高血压是一种常见病 (hypertension)", "zh") > 0.5
    assert script_ratio("Hypertension is a common disease 高血压", "en") > 0.5
    assert script_ratio("高血压 (hypertension)", "en") < 0.5


def test_identical_preference_replies_are_removed(tmp_path: Path) -> None:
    rows = [FORMAT_CASES["preference"][0], {"prompt": USER_Q, "chosen": "一样的回答。", "rejected": " 一样的回答。 "}]
    report, out = process(tmp_path, [write_jsonl(tmp_path / "in.jsonl", rows)], unicode_form="none")
    assert read_jsonl(out / "train.jsonl") == [FORMAT_CASES["preference"][1]]
    assert report["steps"][1]["removed"]["identical_replies"] == 1


def test_filters_remove_and_report_each_rule(tmp_path: Path) -> None:
    rows = [{"text": "正常的一段中文文本，长度足够。"}, {"text": "  \u200b "}, {"text": "短"}, {"text": "长" * 50},
            {"text": "This sample is written in English only."}]
    report, out = process(tmp_path, [write_jsonl(tmp_path / "in.jsonl", rows)], min_chars=3, max_chars=40, lang="zh",
                          keep_rejected=True, unicode_form="NFC")
    assert read_jsonl(out / "train.jsonl") == [rows[0]]
    assert report["steps"][1]["removed"] == {"empty": 1, "identical_replies": 0, "too_short": 1, "too_long": 1,
                                             "language": 1}
    shown = report["rejected_examples"]
    assert shown["too_short"][0]["source"] == f"{tmp_path / 'in.jsonl'}:3"
    assert "min_chars 3" in shown["too_short"][0]["reason"]
    rejected = read_jsonl(out / "rejected.jsonl")
    assert sorted(r["rule"] for r in rejected) == ["empty", "language", "too_long", "too_short"]
    assert {r["source"].rsplit(":", 1)[1] for r in rejected} == {"2", "3", "4", "5"}


def _planted(tmp_path: Path) -> Path:
    """20 distinct Chinese texts, one exact copy (different case and spacing), two near copies, four
    similar texts that are not duplicates."""
    import random

    rng = random.Random(7)
    texts = ["".join(chr(0x4E00 + rng.randrange(3000)) for _ in range(200)) + f" Tag{i}" for i in range(20)]
    near = list(texts[3])
    near[100] = "变"
    rows = [{"text": t} for t in texts]
    rows.append({"text": "  " + texts[5].replace(" Tag", "  TAG") + " "})  # exact after case/space folding
    rows.append({"text": "".join(near)})  # Jaccard about 0.95 with row 4
    rows.append({"text": texts[8][:190] + texts[8][195:]})  # five characters cut out
    rows.append({"text": texts[9][:100] + texts[10][100:]})  # half of two texts: similar to neither
    for source in (11, 12, 13):  # eight characters replaced: Jaccard about 0.65, no duplicate
        edited = list(texts[source])
        for place in range(10, 200, 25):
            edited[place] = "改"
        rows.append({"text": "".join(edited)})
    return write_jsonl(tmp_path / "planted.jsonl", rows)


def test_report_counts_add_up_and_rejected_rows_are_kept_aside(tmp_path: Path) -> None:
    path = _planted(tmp_path)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"text": broken\n{"text": "短"}\n')
    report, out = process(tmp_path, [path], dedup=True, near_dedup=True, on_error="skip", min_chars=5,
                          keep_rejected=True, val_ratio=0.2)
    steps = {s["step"]: s for s in report["steps"]}
    assert report["rows_in"] == 29
    assert steps["read"]["removed"] == {"malformed": 1}
    assert steps["clean"]["removed"]["too_short"] == 1
    assert steps["exact_dedup"]["removed"] == {"exact_duplicate": 1}
    assert steps["near_dedup"]["removed"] == {"near_duplicate": 2}
    previous = report["rows_in"]
    for step in report["steps"][:-1]:
        assert step["rows_in"] == previous
        assert step["rows_out"] == step["rows_in"] - sum(step["removed"].values())
        previous = step["rows_out"]
    split = steps["split"]
    assert split["train"] + split["validation"] == split["rows_in"] == previous == report["rows_out"] == 24
    assert len(read_jsonl(out / "train.jsonl")) == split["train"] == 19
    assert len(read_jsonl(out / "validation.jsonl")) == split["validation"] == 5
    assert len(read_jsonl(out / "rejected.jsonl")) == report["rows_in"] - report["rows_out"]
    near = report["near_duplicates"]
    assert near["clusters"] == 2 and all(c["size"] == 2 for c in near["largest"])
    assert {c["kept"]["source"].rsplit(":", 1)[1] for c in near["largest"]} == {"4", "9"}
    assert all(m["similarity"] >= 0.8 for c in near["largest"] for m in c["removed"])
    assert report["exact_duplicates"]["largest"][0]["kept"]["source"].endswith(":6")
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "near_duplicate 2" in (out / "report.md").read_text(encoding="utf-8")


def test_split_is_deterministic(tmp_path: Path) -> None:
    rows = [{"text": f"sample {i} of many, all different: {i * 7919}"} for i in range(200)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    outs = [process(tmp_path / str(i), [path], val_ratio=0.1, seed=seed, num_proc=procs, batch_size=batch)[1]
            for i, (seed, procs, batch) in enumerate([(1, 1, 1000), (1, 2, 7), (2, 1, 1000)])]
    first, again, other = ((o / "validation.jsonl").read_text(encoding="utf-8") for o in outs)
    assert first == again and first != other
    assert len(first.splitlines()) == 20
    assert (outs[0] / "train.jsonl").read_bytes() == (outs[1] / "train.jsonl").read_bytes()
    train = read_jsonl(outs[0] / "train.jsonl")
    assert train == sorted(train, key=lambda r: int(r["text"].split()[1]))  # input order is kept


def test_token_lengths_with_a_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rows = [{"text": " ".join(["alpha", "beta", "gamma"][: 1 + i % 3] * (i + 1))} for i in range(6)]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # one token per word: the expected counts are known
    tok.train_from_iterator([r["text"] for r in rows], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    report, _ = process(tmp_path, [write_jsonl(tmp_path / "in.jsonl", rows)], tokenizer=str(tmp_path / "tok"))
    words = sorted(len(r["text"].split()) for r in rows)
    tokens = report["lengths"]["tokens"]
    assert (tokens["count"], tokens["min"], tokens["max"]) == (6, words[0], words[-1])
    assert sum(tokens["histogram"]["counts"]) == 6


# --- bad input -------------------------------------------------------------------------------------------


def test_malformed_rows_fail_with_count_and_locations(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "good row here"}\n{"text": oops}\n\n[1, 2]\n{"text": "bad \xff byte"}\n'
                     + b'{"text": "fine again"}\n')
    with pytest.raises(DataError) as exc:
        process(tmp_path, [path])
    msg = str(exc.value)
    assert "3 problem(s)" in msg
    for where, what in ((2, "malformed JSON"), (4, "expected a JSON object"), (5, "not UTF-8")):
        assert f"{path}:{where}: {what}" in msg
    assert "--on_error skip" in msg and not (tmp_path / "out" / "s").exists()
    report, out = process(tmp_path, [path], on_error="skip")
    assert report["steps"][0]["removed"] == {"malformed": 3} and len(read_jsonl(out / "train.jsonl")) == 2


def test_bad_csv_rows_are_named(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b'question,answer\n"multi\nline question",a1\n"bad \xff byte",a2\nq3,a3,extra\n')
    with pytest.raises(DataError) as exc:
        process(tmp_path, [path])
    assert f"{path}:4: not UTF-8" in str(exc.value) and f"{path}:5: expected 2 columns" in str(exc.value)


def test_mixed_formats_in_one_file_are_named(tmp_path: Path) -> None:
    rows = [FORMAT_CASES["sharegpt"][0], FORMAT_CASES["alpaca"][0], FORMAT_CASES["sharegpt"][0]]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(DataError, match=rf"{path}:2: row is 'alpaca' but {path}:1 is 'sharegpt'"):
        process(tmp_path, [path])


def test_files_of_different_kinds_are_refused(tmp_path: Path) -> None:
    sft = write_jsonl(tmp_path / "a.jsonl", [FORMAT_CASES["sharegpt"][0]])
    qa = write_jsonl(tmp_path / "b.jsonl", [FORMAT_CASES["qa"][0]])
    with pytest.raises(UserError, match="one run writes one kind of data"):
        process(tmp_path, [sft, qa])


def test_empty_input_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"empty.jsonl has no rows \(only 2 blank lines\)"):
        process(tmp_path, [tmp_path / "empty.jsonl"])


def test_nothing_left_is_an_error_not_an_empty_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "短"}, {"text": "也短"}])
    with pytest.raises(UserError, match=r"no rows left(.|\n)*too_short 2"):
        process(tmp_path, [path], min_chars=5)
    assert not (tmp_path / "out" / "s").exists()


def test_previous_result_needs_overwrite(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "第一条"}, {"text": "第二条"}])
    _, out = process(tmp_path, [path])
    (out / "keep.txt").write_text("not ours", encoding="utf-8")
    with pytest.raises(UserError, match="already holds a previous result.*--overwrite"):
        process(tmp_path, [path])
    write_jsonl(path, [{"text": "第三条"}])
    process(tmp_path, [path], overwrite=True)
    assert read_jsonl(out / "train.jsonl") == [{"text": "第三条"}] and (out / "keep.txt").exists()
    assert not list((tmp_path / "out").glob(".process_data-*"))  # the work folder is cleaned up


def test_unknown_format_and_bad_options_are_reported_together(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    with pytest.raises(ConfigError) as exc:
        load_process_config(["--input", str(path), "--format", "sharegtp", "--bands", "4", "--threshold", "1.5"])
    problems = "\n".join(exc.value.problems)
    assert "format: unknown format 'sharegtp' (did you mean 'sharegpt'?)" in problems
    assert "bands / rows: set both or neither" in problems and "threshold: 1.5" in problems
    with pytest.raises(DataError, match=r"in.jsonl:1: no 'conversations'|in.jsonl:1: missing key 'conversations'"):
        process(tmp_path, [path], format="sharegpt")


def test_shipped_yaml_loads_and_flags_win(tmp_path: Path) -> None:
    yaml_path = ROOT / "config" / "data_config" / "process.yaml"
    cfg = load_process_config(["--config", str(yaml_path), "--subdir", "v2", "--no-near_dedup", "--min_chars", "9"])
    assert cfg.dedup and not cfg.near_dedup and cfg.subdir == "v2" and cfg.min_chars == 9
    assert cfg.inputs[0].endswith("sft_train.jsonl")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml_path.read_text(encoding="utf-8") + "near_dedupe: true\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="near_dedupe: unknown key \\(did you mean 'near_dedup'\\?\\)"):
        load_process_config(["--config", str(bad)])


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_process_config(["--help"])
    shown = capsys.readouterr().out
    assert all(f"--{name}" in shown for name in ProcessConfig.__dataclass_fields__)


def test_readme_documents_every_option() -> None:
    readme = (ROOT / "data_process" / "README.md").read_text(encoding="utf-8")
    missing = [name for name in ProcessConfig.__dataclass_fields__ if f"`{name}`" not in readme]
    assert not missing, f"options missing from data_process/README.md: {missing}"


def test_readme_commands_fetch_locally_then_process(tmp_path: Path) -> None:
    """The README's offline path as a user runs it: fetch a local file, process the fetched JSONL."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    sample = ROOT / "data_process" / "sample_data" / "sft_train.jsonl"
    fetch = subprocess.run([sys.executable, "data_process/fetch_dataset.py", "--dataset_name", str(sample),
                            "--data_subdir", "finetune", "--output_dir", str(tmp_path / "fetch")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert fetch.returncode == 0, fetch.stderr
    fetched = tmp_path / "fetch" / "finetune" / "sft_train__train.jsonl"
    proc = subprocess.run([sys.executable, "data_process/process_data.py", "--input", str(fetched), "--output_dir",
                           str(tmp_path / "final"), "--subdir", "finetune", "--dedup", "--near_dedup"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "rows in" in proc.stdout
    out = tmp_path / "final" / "finetune"
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["rows_in"] == len(sample.read_text(encoding="utf-8").splitlines())
    assert len(load_conversations([str(out / "train.jsonl"), str(out / "validation.jsonl")])) == report["rows_out"] > 0
    bad = subprocess.run([sys.executable, "data_process/process_data.py", "--input", str(fetched), "--output_dir",
                          str(tmp_path / "final"), "--subdir", "finetune"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 1 and "--overwrite" in bad.stderr and "Traceback" not in bad.stderr
