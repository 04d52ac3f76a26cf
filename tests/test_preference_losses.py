"""KTO, ORPO and SimPO through trl on the tiny model (CPU), each from preference.yaml: the eval data scored before and
after training (desirable minus undesirable log-prob margin rises), KTO's unpaired rows and split pairs, KTO rows
refused by SFT / DPO / ORPO / the reward model with a pointer to KTO, and bad config keys."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from rl_helpers import SAMPLES, TEMPLATE, make_sft_adapter

from self_model.core.config import load_config
from self_model.core.conversations import KTO_COMMAND
from self_model.core.errors import ConfigError, DataError, UserError
from self_model.rlhf.preference.config import PreferenceStageConfig

train_preference = pytest.importorskip("self_model.rlhf.train_preference", reason="entry script importable")
ROOT = Path(__file__).resolve().parents[1]
SHIPPED = yaml.safe_load((ROOT / "config" / "self_model_config" / "preference.yaml").read_text(encoding="utf-8"))
PAIRS = {"data.train_file": str(SAMPLES / "dpo_train.jsonl"), "data.eval_file": str(SAMPLES / "dpo_eval.jsonl")}


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sft_adapter(tiny_model_dir, tmp_path_factory.mktemp("sft") / "final")


def preference_config(tiny_model_dir: Path, output_dir: Path, adapter: Path | None = None,
                      overrides: dict[str, Any] | None = None) -> PreferenceStageConfig:
    """The shipped preference.yaml pointed at the tiny model (and an SFT adapter), the sample data, a temp folder."""
    data = copy.deepcopy(SHIPPED)
    data.update(model_name_or_path=str(tiny_model_dir), template_path=str(TEMPLATE),
                tokenizer_name_or_path=str(adapter or tiny_model_dir),
                adapter_name_or_path=str(adapter) if adapter else None)
    data["data"].update(train_file=str(SAMPLES / "kto_train.jsonl"), eval_file=str(SAMPLES / "kto_eval.jsonl"))
    data["training_args"].update(output_dir=str(output_dir), disable_tqdm=True, max_steps=8, logging_steps=4,
                                 learning_rate=5.0e-3)
    return load_config(PreferenceStageConfig, None, [f"{k}={v}" for k, v in (overrides or {}).items()], data=data)


def before_after(final: Path, name: str) -> dict[str, Any]:
    results = json.loads((final / "eval_results.json").read_text())
    before, after = results["before"], results["after"]
    line = f"{name}: eval log-prob margin {before['logp_margin']:.4f} -> {after['logp_margin']:.4f}"
    if "pair_accuracy" in before:
        line += f", pair accuracy {before['pair_accuracy']:.3f} -> {after['pair_accuracy']:.3f}"
    print(line)
    return results


# ---- end to end ------------------------------------------------------------------------------------------------
# KTO's learning is measured on the demo pairs (data_process/sample_data/demo: one consistent answer against a wrong
# or unhelpful one, split into a desirable and an undesirable row each): on the 8 general-medicine KTO sample rows the
# random tiny model has nothing in common between train and eval replies to learn, and the eval margin only drifts.
# Reading unpaired rows is tested below (test_kto_reads_unpaired_rows_and_splits_pairs).
DEMO = SAMPLES / "demo"


@pytest.mark.slow
def test_kto_from_an_sft_adapter_prefers_desirable_replies(tiny_model_dir: Path, sft_adapter: Path,
                                                           tmp_path: Path) -> None:
    final = train_preference.main(preference_config(
        tiny_model_dir, tmp_path / "run", sft_adapter,
        {"data.train_file": str(DEMO / "dpo_train.jsonl"), "data.eval_file": str(DEMO / "dpo_eval.jsonl")}))
    assert final is not None and final.name == "final"
    report = json.loads((final / "data_report.json").read_text())
    assert report["loss"] == "kto" and report["reference"].startswith("stacked:")  # the reference is the SFT model
    assert report["train_data"]["desirable"] == 72 and report["train_data"]["undesirable"] == 72
    results = before_after(final, "KTO")
    assert results["eval_replies"] == 48
    assert results["after"]["logp_margin"] > results["before"]["logp_margin"] + 0.05  # summed log-probs (KTO)
    # trl's own KTO reward margin: 0 at the start (policy = reference), positive after.
    assert results["trl_before"]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert results["trl_after"]["rewards/margins"] > 0
    assert (final / "adapter_config.json").is_file() and not (final / "ref").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("loss", "overrides"), [
    # A random tiny model: ORPO's odds-ratio term must outweigh its language-model (NLL) term to move the margin.
    ("orpo", {"beta": "10.0", "training_args.learning_rate": "1.0e-2"}),
    ("simpo", {"beta": "2.0", "training_args.simpo_gamma": "0.5"}),
])
def test_reference_free_losses_on_pairs(loss: str, overrides: dict[str, str], tiny_model_dir: Path,
                                        tmp_path: Path) -> None:
    final = train_preference.main(preference_config(tiny_model_dir, tmp_path / "run", None,
                                                    {"loss": loss, **PAIRS, **overrides}))
    report = json.loads((final / "data_report.json").read_text())
    assert report["reference"] == f"none: {'ORPO' if loss == 'orpo' else 'SimPO'} uses no reference model"
    results = before_after(final, loss)
    assert results["after"]["logp_margin"] > results["before"]["logp_margin"] + 0.005  # mean per-token log-probs
    assert results["after"]["pair_accuracy"] > results["before"]["pair_accuracy"]
    assert results["trl_after"]["rewards/margins"] > results["trl_before"]["rewards/margins"]
    config = yaml.safe_load((final / "run_config.yaml").read_text())
    assert config["loss"] == loss


# ---- data --------------------------------------------------------------------------------------------------------
def test_kto_reads_unpaired_rows_and_splits_pairs(tiny_tokenizer: Any, tmp_path: Path) -> None:
    from self_model.rlhf.config import DPODataConfig
    from self_model.rlhf.preference.data import build_kto_dataset, load_kto_rows
    from self_model.template.chat_template import load_template

    template = load_template(TEMPLATE)
    data = DPODataConfig(train_file=str(SAMPLES / "kto_train.jsonl"), max_length=512)
    split, report = build_kto_dataset(str(SAMPLES / "dpo_train.jsonl"), tiny_tokenizer, template, data)
    assert len(split) == 80 and report.desirable == report.undesirable == 40
    # The chosen reply of pair 1 is row 1 of kto_train.jsonl: the same ids either way, prompt then trained reply.
    unpaired, _ = build_kto_dataset(str(SAMPLES / "kto_train.jsonl"), tiny_tokenizer, template, data)
    assert split[0] == unpaired[0] and split[0]["label"] is True and split[1]["label"] is False
    assert tiny_tokenizer.decode(split[0]["completion_ids"]).endswith("<|im_end|>")
    rows = [{"conversations": [{"from": "human", "value": "头痛怎么办？"}, {"from": "gpt", "value": "多休息。"}],
             "kto_tag": False},
            {"conversations": [{"from": "human", "value": "发烧怎么办？"}, {"from": "gpt", "value": "多喝水。"}],
             "kto_tag": True}]
    (tmp_path / "sharegpt.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert [r["label"] for r in load_kto_rows(str(tmp_path / "sharegpt.jsonl"), None)] == [False, True]
    trl_rows = [{"prompt": "头痛怎么办？", "completion": "多休息。", "label": True}]
    (tmp_path / "trl.jsonl").write_text(json.dumps(trl_rows[0], ensure_ascii=False) + "\n")
    (row,) = load_kto_rows(str(tmp_path / "trl.jsonl"), None)
    assert row["prompt"] == [{"role": "user", "content": "头痛怎么办？"}] and row["reply"]["content"] == "多休息。"
    # Bad rows: a label that is not true / false, a file that mixes unpaired rows and pairs.
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "label": "yes"}
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(DataError) as err:
        load_kto_rows(str(tmp_path / "bad.jsonl"), None)
    assert "bad.jsonl:1: 'label' must be true (a desirable reply) or false" in str(err.value)
    (tmp_path / "mixed.jsonl").write_text((SAMPLES / "kto_eval.jsonl").read_text().splitlines()[0] + "\n" +
                                          (SAMPLES / "dpo_eval.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match="mixed.jsonl:2: row is 'sharegpt .pairs, split.' but .* one file holds one"):
        load_kto_rows(str(tmp_path / "mixed.jsonl"), None)
    (tmp_path / "good_only.jsonl").write_text(json.dumps(rows[1], ensure_ascii=False) + "\n")
    with pytest.raises(UserError, match="KTO needs desirable and undesirable replies; got 1 desirable and 0"):
        build_kto_dataset(str(tmp_path / "good_only.jsonl"), tiny_tokenizer, template, data)


def test_kto_rows_are_refused_by_pair_stages_with_a_pointer_to_kto(tiny_model_dir: Path, tmp_path: Path) -> None:
    from self_model.core.conversations import load_conversations
    from self_model.core.preferences import load_preference_pairs

    kto = str(SAMPLES / "kto_train.jsonl")
    with pytest.raises(DataError) as err:
        load_conversations(kto)
    assert "kto_train.jsonl:2: this is a KTO row ('label': false marks its reply desirable or not); SFT would " \
           "train it" in str(err.value) and KTO_COMMAND in str(err.value)
    with pytest.raises(DataError) as err:
        load_preference_pairs(kto)
    assert "DPO would train it" in str(err.value) and KTO_COMMAND in str(err.value)
    cfg = preference_config(tiny_model_dir, tmp_path / "run", None, {"loss": "orpo"})  # KTO rows given to ORPO
    with pytest.raises(DataError) as err:
        train_preference.main(cfg, dry_run=True)
    assert "ORPO would train it" in str(err.value) and "ORPO needs a chosen and a rejected reply" in str(err.value)
    assert not (tmp_path / "run").exists()


# ---- config ------------------------------------------------------------------------------------------------------
def problems(build: Any) -> str:
    with pytest.raises(ConfigError) as err:
        build()
    return str(err.value)


def test_unknown_loss_and_arguments_of_another_loss_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    def make(overrides: dict[str, str]) -> Any:
        return lambda: preference_config(tiny_model_dir, tmp_path / "run", None, overrides)

    assert "loss: unknown loss 'kot' (did you mean 'kto'?); one of ['kto', 'orpo', 'simpo']" in problems(
        make({"loss": "kot"}))
    assert "self_model/rlhf/train_dpo.py" in problems(make({"loss": "dpo"}))
    text = problems(make({"loss": "orpo", "training_args.desirable_weight": "2.0"}))
    assert "training_args.desirable_weight: unknown ORPOConfig argument" in text
    assert "training_args.loss_type: set by this toolkit; use loss: simpo" in problems(
        make({"loss": "simpo", "training_args.loss_type": "hinge"}))
    assert "training_args.beta: set by this toolkit; use the top-level beta:" in problems(
        make({"training_args.beta": "0.2"}))
    assert "did you mean 'desirable_weight'" in problems(make({"training_args.desirable_weigth": "2.0"}))


def test_preference_yaml_dry_run(tiny_model_dir: Path, sft_adapter: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = preference_config(tiny_model_dir, tmp_path / "run", sft_adapter)
    assert train_preference.main(cfg, dry_run=True) is None
    out = capsys.readouterr().out
    assert "(LoRA KTO); beta 0.1" in out and "reference:  stacked: KTO keeps training the SFT adapter" in out
    assert "'desirable': 40, 'undesirable': 40" in out and "<|im_end|>]]" in out
    assert not (tmp_path / "run").exists()
