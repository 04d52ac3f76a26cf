"""fetch_dataset.py: local sources become <name>__<split>.jsonl through `datasets`; no network fails at once."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_process.dataproc.fetch import fetch
from self_model.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"instruction": f"问题{i}", "input": "", "output": f"回答{i}"} for i in range(4)]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep datasets' Arrow cache inside the test folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_local_files_of_every_type(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    (src / "b.json").write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(ROWS), src / "c.parquet")
    with open(src / "d.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(ROWS[0]))
        writer.writeheader()
        writer.writerows(ROWS)
    for name in ("a.jsonl", "b.json", "c.parquet", "d.csv"):
        (path,) = fetch(str(src / name), "finetune", str(tmp_path / "out"))
        assert path == tmp_path / "out" / "finetune" / f"{Path(name).stem}__train.jsonl"
        rows = read_jsonl(path)
        assert [{k: r[k] or "" for k in ROWS[0]} for r in rows] == ROWS, name  # csv reads "" as null
        assert "问题0" in path.read_text(encoding="utf-8")  # written as UTF-8, not \\u escapes
    (src / "e.txt").write_text("第一行\n第二行\n", encoding="utf-8")
    (path,) = fetch(str(src / "e.txt"), "pretrain", str(tmp_path / "out"))
    assert read_jsonl(path) == [{"text": "第一行"}, {"text": "第二行"}]


def test_local_folder_keeps_its_splits(tmp_path: Path) -> None:
    folder = tmp_path / "my_data"
    folder.mkdir()
    for split, rows in (("train", ROWS[:3]), ("test", ROWS[3:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    paths = fetch(str(folder), "finetune", str(tmp_path / "out"))
    assert sorted(p.name for p in paths) == ["my_data__test.jsonl", "my_data__train.jsonl"]
    assert len(read_jsonl(tmp_path / "out" / "finetune" / "my_data__train.jsonl")) == 3


def test_existing_output_and_missing_source(tmp_path: Path) -> None:
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    fetch(str(src), "finetune", str(tmp_path / "out"))
    with pytest.raises(UserError, match="already fetched.*--overwrite"):
        fetch(str(src), "finetune", str(tmp_path / "out"))
    fetch(str(src), "finetune", str(tmp_path / "out"), overwrite=True)
    with pytest.raises(UserError, match="no such file or folder: ./missing.jsonl"):
        fetch("./missing.jsonl", "finetune", str(tmp_path / "out"))


@pytest.mark.parametrize("how", ["offline_env", "unreachable_endpoint"])
def test_hub_without_network_fails_with_a_way_out(tmp_path: Path, how: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_DATASETS_CACHE"] = str(tmp_path / "cache")
    env["HF_HOME"] = str(tmp_path / "hf_home")
    if how == "offline_env":
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    else:  # the probe path: nothing listens on port 9, so the connection is refused at once
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    # The timeout only guards against a hang; datasets' own retries would take about 25 s.
    proc = subprocess.run([sys.executable, "data_process/fetch_dataset.py", "--dataset_name", "shibing624/medical",
                           "--data_subdir", "finetune", "--output_dir", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "cannot download 'shibing624/medical'" in proc.stderr
    assert "--dataset_name path/to/data.jsonl" in proc.stderr and "HF_DATASETS_OFFLINE" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
