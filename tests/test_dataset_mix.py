"""Datasets by name and mixing (README "Datasets by name and mixing"): config/datasets.yaml names data sets; every
stage's `data.datasets` (GRPO: `ppo.datasets`) mixes them with `datasets`' concatenate / interleave, seeded, with
per-data-set caps, a plan printed by --dry-run, and every bad input refused with where and how to fix it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, SAMPLE_DIR
from rl_helpers import rl_config

from self_model.core.config import load_config
from self_model.core.dataset_mix import RegistryEntry, Source, mix_sources, read_registry
from self_model.core.errors import ConfigError, DataError, UserError

REGISTRY = ROOT / "config" / "datasets.yaml"


def registry(tmp_path: Path, entries: dict[str, Any], text: str | None = None) -> str:
    path = tmp_path / "datasets.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(entries, allow_unicode=True), encoding="utf-8")
    return str(path)


def source(name: str, weight: float | None = None, cap: int | None = None) -> Source:
    return Source(name, RegistryEntry(path=str(SAMPLE_DIR / "sft_train.jsonl")), "here:1", weight, cap)


@pytest.mark.parametrize("mix", ["interleave_under", "interleave_over"])
def test_shares_follow_the_weights_and_the_mix_is_seeded(mix: str) -> None:
    rows = {"a": [("a", i) for i in range(3000)], "b": [("b", i) for i in range(3000)], "c": [("c", i) for i in
                                                                                           range(3000)]}
    srcs = [source("a", 6), source("b", 3), source("c", 1, cap=2000)]  # weights normalised: 0.6 / 0.3 / 0.1
    mixed, plan = mix_sources(srcs, lambda s: rows[s.name], mix, seed=7)
    assert [p["weight"] for p in plan] == [0.6, 0.3, 0.1]
    if mix == "interleave_under":  # stops when the first source runs out: every share is the weight
        for p in plan:
            assert p["share"] == pytest.approx(p["weight"], abs=0.02), plan
    assert plan[2]["rows_read"] == 3000 and len({r for r in mixed if r[0] == "c"}) <= 2000  # the cap
    assert sum(p["rows_in_mix"] for p in plan) == len(mixed)
    assert mix_sources(srcs, lambda s: rows[s.name], mix, seed=7)[0] == mixed
    assert mix_sources(srcs, lambda s: rows[s.name], mix, seed=8)[0] != mixed


def test_concat_keeps_every_row_of_each_after_its_cap() -> None:
    mixed, plan = mix_sources([source("a", cap=5), source("b")], lambda s: list(range(10)), "concat", seed=1)
    assert len(mixed) == 15 and [p["rows_in_mix"] for p in plan] == [5, 10]


def sft_datasets(sft_config: Any, datasets: list[dict[str, Any]], mix: str = "interleave_under", **data: Any) -> Any:
    return sft_config(data={"train_file": None, "eval_file": None, "datasets": datasets, "mix": mix, **data})


def test_sft_dry_run_prints_the_plan_and_trains_on_the_mix(sft_config: Any, capsys: pytest.CaptureFixture) -> None:
    from self_model.fine_tuning import train_finetune

    cfg = sft_datasets(sft_config, [{"name": "sft_sample", "weight": 0.5, "max_samples": 30},
                                    {"name": "sft_alpaca_sample", "weight": 0.5, "max_samples": 20}])
    train_finetune.main(cfg, dry_run=True)
    out = capsys.readouterr().out
    assert "data mix:   interleave_under of 2 data sets (seed 42)" in out
    assert "sft_sample: 80 rows read, capped at 30" in out and "sft_alpaca_sample: 20 rows read" in out
    assert "format 'alpaca'" in out and "format 'sharegpt'" in out  # both data sets reached the samples
    final = train_finetune.main(cfg)
    report = json.loads((final / "data_report.json").read_text(encoding="utf-8"))
    shares = {p["name"]: p for p in report["mix"]}
    assert shares["sft_sample"]["rows_in_mix"] <= 30 and shares["sft_alpaca_sample"]["rows_in_mix"] <= 20
    assert abs(shares["sft_sample"]["share"] - 0.5) < 0.15


def test_column_mapping_feeds_the_converters_and_bad_rows_keep_their_line(sft_config: Any, tmp_path: Path) -> None:
    from self_model.fine_tuning import train_finetune

    rows = [{"q": "什么是高血压？", "a": "血压持续升高的状态。"}, {"q": "感冒怎么办？", "a": "多休息，多喝水。"},
            {"q": "发烧了", "reply": "缺了 a 列"}]
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    reg = registry(tmp_path, {"qa": {"path": str(data), "format": "alpaca",
                                     "columns": {"instruction": "q", "output": "a"}}})
    cfg = sft_datasets(sft_config, [{"name": "qa"}], mix="concat", dataset_registry=reg)
    with pytest.raises(DataError, match=rf"{data}:3: "):
        train_finetune.main(cfg, dry_run=True)
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:2]) + "\n", encoding="utf-8")
    train_finetune.main(cfg, dry_run=True)  # mapped rows read as alpaca


def test_cpt_accepts_datasets_and_prints_the_plan(pretrain_config: Any, capsys: pytest.CaptureFixture) -> None:
    from self_model.pretrain import train_pretrain

    cfg = pretrain_config(data={"train_file": None, "eval_file": None, "block_size": 64, "mix": "interleave_over",
                                "datasets": [{"name": "pretrain_sample", "weight": 3, "max_samples": 60},
                                             {"name": "pretrain_eval_sample", "weight": 1}]})
    train_pretrain.main(cfg, dry_run=True)
    out = capsys.readouterr().out
    assert "pretrain_sample: 150 rows read, capped at 60" in out and "weight 0.75" in out


def test_dpo_and_grpo_accept_datasets(tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
                                      ) -> None:
    from self_model.rlhf import train_dpo, train_grpo
    from self_model.rlhf.config import DPOStageConfig, GRPOStageConfig

    dpo = rl_config(DPOStageConfig, tiny_model_dir, tmp_path / "grpo", overrides={
        "data.train_file": "null", "data.eval_file": "null", "training_args.output_dir": str(tmp_path / "dpo"),
        "data.datasets": "[{name: dpo_sample, max_samples: 12}, {name: dpo_eval_sample}]"})
    with caplog.at_level("INFO", logger="self_model"):
        train_dpo.main(dpo, dry_run=True)
    assert "dpo_sample: 40 rows read, capped at 12 -> 12 in the mix" in caplog.text
    grpo = rl_config(GRPOStageConfig, tiny_model_dir, tmp_path / "grpo", overrides={
        "ppo.train_file": "null", "ppo.mix": "interleave_over",
        "ppo.datasets": "[{name: grpo_sample, weight: 1}, {name: grpo_eval_sample, weight: 1}]"})
    caplog.clear()
    with caplog.at_level("INFO", logger="self_model"):
        train_grpo.main(grpo, dry_run=True)
    assert "grpo_eval_sample: 8 rows read" in caplog.text and "(seed " in caplog.text


def test_kto_mixes_its_rows_and_split_pairs_by_name(tiny_model_dir: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """KTO takes data sets by name too: unpaired rows and preference pairs (each split in two) in one mix."""
    from test_preference_losses import preference_config

    from self_model.rlhf import train_preference

    cfg = preference_config(tiny_model_dir, tmp_path / "kto", overrides={
        "data.train_file": "null", "data.eval_file": "null",
        "data.datasets": "[{name: kto_sample, max_samples: 10}, {name: dpo_sample}]"})
    with caplog.at_level("INFO", logger="self_model"):
        train_preference.main(cfg, dry_run=True)
    assert "kto_sample: 80 rows read, capped at 10 -> 10 in the mix" in caplog.text
    assert "dpo_sample: 80 rows read" in caplog.text  # 40 pairs, each a desirable and an undesirable row


def test_the_shipped_registry_names_existing_files() -> None:
    entries = read_registry(str(REGISTRY))
    assert {"sft_sample", "dpo_sample", "grpo_sample", "pretrain_sample"} <= set(entries)
    for entry, where in entries.values():
        assert Path(entry.path).is_file(), where  # type: ignore[arg-type]


@pytest.mark.parametrize(("datasets", "extra", "message"), [
    ([{"name": "sft_sampel"}], {}, "unknown data set 'sft_sampel' (did you mean 'sft_sample'?)"),
    ([{"name": "sft_sample", "weight": -1}, {"name": "dpo_sample", "weight": 1}], {"mix": "interleave_under"},
     "weights must be positive"),
    ([{"name": "sft_sample", "weight": 0}, {"name": "dpo_sample", "weight": 0}], {"mix": "interleave_over"},
     "weights must be positive"),
    ([{"name": "sft_sample", "weight": 0.5}, {"name": "dpo_sample"}], {"mix": "interleave_under"},
     "every data set a weight, or none"),
    ([{"name": "sft_sample", "weight": 0.5}, {"name": "dpo_sample", "weight": 0.5}], {"mix": "concat"},
     "weights need data.mix: interleave_under"),
    ([{"name": "sft_sample"}, {"name": "sft_sample"}], {}, "'sft_sample' is named twice"),
    ([{"name": "sft_sample", "max_samples": 0}], {}, "max_samples: expected at least 1"),
    ([{"name": "sft_sample", "wieght": 1}], {}, "unknown key (did you mean 'weight'?)"),
    ([{"name": "sft_sample"}], {"train_file": str(SAMPLE_DIR / "sft_train.jsonl")}, "set one of them"),
    ([{"name": "sft_sample"}], {"mix": "interleave"}, "did you mean 'interleave_over'"),
    ([{"name": "sft_sample"}, {"name": "sft_alpaca_sample"}], {"max_samples": 10}, "the first data set's rows only"),
])
def test_bad_mixes_are_refused(datasets: list[dict[str, Any]], extra: dict[str, Any], message: str,
                               sft_config: Any) -> None:
    with pytest.raises(ConfigError) as err:
        sft_config(data={"train_file": None, "eval_file": None, "datasets": datasets, **extra})
    assert message in str(err.value)


def test_neither_train_file_nor_datasets(sft_config: Any) -> None:
    with pytest.raises(ConfigError, match="data.train_file or data.datasets: one is required"):
        sft_config(data={"train_file": None})


def test_registry_errors_are_cited_file_line_and_key(sft_config: Any, tmp_path: Path) -> None:
    text = ("good:\n  path: data_process/sample_data/sft_train.jsonl\n"
            "typo:\n  pth: x.jsonl\n"
            "gone:\n  path: nowhere/rows.jsonl\n"
            "both:\n  path: data_process/sample_data/sft_train.jsonl\n  hub: org/name\n")
    reg = registry(tmp_path, {}, text)
    with pytest.raises(ConfigError) as err:
        sft_config(data={"train_file": None, "datasets": [{"name": "good"}], "dataset_registry": reg})
    message = str(err.value)
    assert f"{reg}:3: typo.pth: unknown key (did you mean 'path'?)" in message
    assert f"{reg}:5: gone.path: nothing found at nowhere/rows.jsonl" in message
    assert f"{reg}:7: both: give either path (local files) or hub" in message
    broken = registry(tmp_path, {}, "good:\n  path: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{broken}:\d+: not valid YAML"):
        sft_config(data={"train_file": None, "datasets": [{"name": "good"}], "dataset_registry": broken})
    with pytest.raises(ConfigError, match="dataset_registry: file not found"):
        sft_config(data={"train_file": None, "datasets": [{"name": "good"}],
                         "dataset_registry": str(tmp_path / "none.yaml")})


def test_a_hub_dataset_offline_says_how_to_get_it(sft_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    from self_model.core import dataset_mix
    from self_model.fine_tuning import train_finetune

    monkeypatch.setattr(dataset_mix, "HUB_CACHE", tmp_path / "hub")
    reg = registry(tmp_path, {"alpaca_zh": {"hub": "someone/alpaca-zh-not-cached", "format": "alpaca"}})
    cfg = sft_datasets(sft_config, [{"name": "alpaca_zh"}], mix="concat", dataset_registry=reg)
    with pytest.raises(UserError, match=r"cannot load someone/alpaca-zh-not-cached .*\n.*Offline"):
        train_finetune.main(cfg, dry_run=True)


def test_every_stage_config_accepts_datasets(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The four sections that name training data take `datasets` (CPT's corpus, SFT / DPO's data, GRPO's ppo)."""
    from self_model.pretrain.config import PretrainDataConfig
    from self_model.rlhf.config import DPODataConfig, RLSection

    for cls, name in ((PretrainDataConfig, "pretrain_sample"), (DPODataConfig, "dpo_sample"),
                      (RLSection, "grpo_sample")):
        section = load_config(cls, None, data={"datasets": [{"name": name, "max_samples": 3}]})
        assert section.datasets[0].name == name and section.train_file is None


def test_export_finds_the_check_prompts_of_a_run_trained_on_named_data_sets() -> None:
    """An export reads the run's data for its merge check: data sets named in `datasets:` resolve to their files."""
    from self_model.tools.export_data import run_data

    found = run_data({"data": {"datasets": [{"name": "sft_sample"}, {"name": "sft_alpaca_sample", "weight": 1.0}],
                               "dataset_registry": str(ROOT / "config" / "datasets.yaml")}}, stage="sft")
    assert [Path(f).name for f in found.train] == ["sft_train.jsonl", "sft_alpaca.jsonl"]
    grpo = run_data({"ppo": {"datasets": [{"name": "grpo_sample"}]}}, stage="grpo")
    assert [Path(f).name for f in grpo.train] == ["grpo_train.jsonl"]
