"""Download a dataset with `datasets` (or read a local copy) and write each split as JSON Lines.

Hub ids go through `datasets.load_dataset`; a local file or folder goes through the same call with the
matching packaged builder (json / parquet / csv / text), so a local copy produces the very same files.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from self_model.core.errors import UserError

logger = logging.getLogger("self_model")
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
PROBE_TIMEOUT_S = 10
_SPLIT_CHARS = re.compile(r"[^\w.-]+")


def offline_help(name: str, reason: str) -> str:
    cache = ("  - the dataset is not in this machine's cache, so offline mode (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) "
             "cannot help until it has been downloaded once" if is_offline() else
             "  - or, when the dataset was downloaded on this machine before, use the cache: "
             "HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 uv run python data_process/fetch_dataset.py ...")
    return (f"cannot download '{name}' from the Hugging Face Hub: {reason}\n"
            "To work without the Hub:\n"
            "  - pass a local copy: --dataset_name path/to/data.jsonl (also .json, .parquet, .csv, .txt, or a folder "
            f"of them)\n{cache}\n"
            "  - or point HF_ENDPOINT at a mirror you can reach")


def is_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE",
                                                                                         "HF_DATASETS_OFFLINE"))


def check_hub(name: str, revision: str | None) -> None:
    """Fail within seconds when the Hub cannot be reached: datasets itself retries for about half a minute."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().dataset_info(name, revision=revision, timeout=PROBE_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise UserError(f"dataset '{name}' was not found on the Hugging Face Hub (or it is private: log in with "
                        "`hf auth login`); for a local file give its path") from None
    except RevisionNotFoundError:
        raise UserError(f"dataset '{name}' has no revision '{revision}'") from None
    except HfHubHTTPError:
        return  # the Hub answered (gated, rate-limited, ...): datasets reports that with its own message
    except Exception as exc:  # noqa: BLE001 - transport errors come from httpx or requests, by version
        raise UserError(offline_help(name, f"{type(exc).__name__}: {exc}")) from None


def output_name(source: str) -> str:
    path = Path(source)
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return source.replace("/", "_")


def load_local(path: Path, split: str | None) -> Any:
    import datasets

    if path.is_dir():
        return datasets.load_dataset(str(path), split=split)
    builder = BUILDERS.get(path.suffix)
    if builder is None:
        raise UserError(f"{path}: unsupported file type '{path.suffix}'; expected one of {sorted(BUILDERS)}")
    return datasets.load_dataset(builder, data_files=str(path), split=split)


def load_hub(name: str, config: str | None, split: str | None, revision: str | None, subdir: str) -> Any:
    import datasets

    if not is_offline():
        check_hub(name, revision)
    try:
        return datasets.load_dataset(name, config, split=split, revision=revision)
    except ConnectionError as exc:
        raise UserError(offline_help(name, str(exc).splitlines()[0])) from None
    except ValueError as exc:
        if config is not None or "config name is missing" not in str(exc).lower():
            raise UserError(f"cannot load '{name}': {exc}") from None
        configs = datasets.get_dataset_config_names(name, revision=revision)
        if subdir not in configs:
            raise UserError(f"'{name}' has several configurations {configs}; choose one with --config_name") from None
        # `--data_subdir finetune` on a dataset with a `finetune` configuration means that configuration.
        logger.info("using configuration '%s' of %s (from --data_subdir)", subdir, name)
        return datasets.load_dataset(name, subdir, split=split, revision=revision)


def fetch(name: str, subdir: str, output_dir: str = "data_process/fetch_data", config: str | None = None,
          split: str | None = None, revision: str | None = None, overwrite: bool = False) -> list[Path]:
    """Write <output_dir>/<subdir>/<name>__<split>.jsonl for each split; returns the files written."""
    import datasets

    local = Path(name).expanduser()
    if local.exists():
        loaded = load_local(local, split)
    elif name.startswith((".", "/", "~")) or local.suffix in BUILDERS or name.count("/") > 1:
        raise UserError(f"no such file or folder: {name} (and it is not a hub id of the form org/name)")
    else:
        loaded = load_hub(name, config, split, revision, subdir)
    splits = {split: loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
    target = Path(output_dir) / subdir
    # A split expression such as train[:1000] becomes train_1000_ in the file name.
    paths = {s: target / f"{output_name(name)}__{_SPLIT_CHARS.sub('_', str(s))}.jsonl" for s in splits}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise UserError(f"already fetched: {', '.join(existing)}; pass --overwrite to download again")
    target.mkdir(parents=True, exist_ok=True)
    for s, ds in splits.items():
        ds.to_json(str(paths[s]), force_ascii=False, lines=True)
        logger.info("%s: %d rows, columns %s", paths[s], len(ds), ds.column_names)
    return list(paths.values())
