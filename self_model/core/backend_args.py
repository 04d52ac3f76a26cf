"""Check a pass-through YAML section (`training_args:`) against the backend's own arguments class.

Importing `transformers.TrainingArguments` or trl's configs pulls in peft, bitsandbytes, deepspeed and
more: 10+ seconds before the first config error could be shown. So the field names and annotations are
read from the installed source of the class (and its base classes) with `ast`, which takes milliseconds
and follows whatever version is installed. The real class is still instantiated later, before training.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import cache
from pathlib import Path
from typing import Any

from self_model.core.config import coerce, did_you_mean

# Keys older tutorials use that current transformers / trl reject, and what to write instead.
RENAMED_ARGS = {
    "evaluation_strategy": "use eval_strategy",
    "no_cuda": "use use_cpu",
    "warmup_ratio": "use warmup_steps with a fraction below 1 (e.g. warmup_steps: 0.03)",
    "overwrite_output_dir": "finished runs are never overwritten: pick a new output_dir, or resume with "
                            "resume_from_checkpoint: auto",
    "logging_dir": "logs go to the run folder and the tracker chosen by trace:",
    "max_seq_length": "use data.max_length",
    "group_by_length": "removed from transformers",
    "save_safetensors": "checkpoints are always safetensors",
    "torch_dtype": "precision follows fp16 / bf16",
}
RESERVED_ARGS = {"report_to": "trace: (none / wandb / swanlab)"}
# The TrainingArguments / trl config defaults every stage starts from (each stage adds or overrides a few; any of them
# can be set in the YAML's training_args).
RUN_DEFAULTS: dict[str, Any] = {
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 3,
    "include_num_input_tokens_seen": "non_padding",  # tokens/s counts real tokens, not padding
    "lr_scheduler_type": "cosine",
}
TRAINING_ARGUMENTS = "transformers.training_args:TrainingArguments"
_SCALARS = {"int": int, "float": float, "bool": bool}


@cache
def backend_fields(spec: str) -> dict[str, str]:
    """`module:Class` -> {field name: annotation source}, base classes included (subclass wins)."""
    module, cls_name = spec.split(":")
    found = importlib.util.find_spec(module)
    if found is None or not found.origin:
        raise ImportError(f"cannot find {module}")
    tree = ast.parse(Path(found.origin).read_text(encoding="utf-8"))
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls_name), None)
    # A package __init__ re-exports the class (transformers: under `if TYPE_CHECKING:`): follow that import.
    package = module if found.submodule_search_locations is not None else module.rsplit(".", 1)[0]
    if cls is None:
        if origin := _imported_from(ast.Module(body=list(ast.walk(tree)), type_ignores=[]), cls_name, package):
            return backend_fields(f"{origin}:{cls_name}")
        raise ImportError(f"{module} defines no class {cls_name}")
    fields: dict[str, str] = {}
    for base in cls.bases:
        if isinstance(base, ast.Name) and (origin := _imported_from(tree, base.id, package)):
            fields.update(backend_fields(f"{origin}:{base.id}"))
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if "ClassVar" not in ast.unparse(node.annotation):
                fields[node.target.id] = ast.unparse(node.annotation)
    return fields


def _imported_from(tree: ast.Module, name: str, package: str) -> str | None:
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            if node.level == 0:
                return node.module
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1])
            return f"{base}.{node.module}" if node.module else base
    return None


def _scalar_type(annotation: str) -> type | None:
    """int / float / bool when the annotation is exactly that (optionally `| None`), else None."""
    text = annotation.replace("Optional[", "").replace("]", "").replace(" ", "")
    parts = [p for p in text.split("|") if p != "None"]
    return _SCALARS.get(parts[0]) if len(parts) == 1 else None


def check_backend_args(args: dict[str, Any], spec: str, section: str = "training_args",
                       renamed: dict[str, str] | None = None, reserved: dict[str, str] | None = None) -> list[str]:
    """Unknown keys (did-you-mean), renamed keys, keys this toolkit sets itself, and wrong scalar types."""
    fields = backend_fields(spec)
    cls_name = spec.split(":")[1]
    errors: list[str] = []
    for key, value in args.items():
        path = f"{section}.{key}"
        if renamed and key in renamed:
            errors.append(f"{path}: not an argument of {cls_name} any more; {renamed[key]}")
        elif reserved and key in reserved:
            errors.append(f"{path}: set by this toolkit; use {reserved[key]} instead")
        elif key not in fields:
            errors.append(f"{path}: unknown {cls_name} argument{did_you_mean(key, fields)}")
        elif isinstance(value, bool) and "Strategy" in fields[key]:
            # YAML 1.1 reads `eval_strategy: no` as false; the backend wants the string "no".
            if value:
                errors.append(f"{path}: expected one of no / steps / epoch, got true")
            else:
                args[key] = "no"
        elif value is not None and (tp := _scalar_type(fields[key])) is not None:
            args[key] = coerce(value, tp, path, errors)
    return errors


def check_training_args(args: dict[str, Any], spec: str = TRAINING_ARGUMENTS) -> list[str]:
    return check_backend_args(args, spec, "training_args", RENAMED_ARGS, RESERVED_ARGS)


@cache
def compared_strings(module: str, name: str) -> list[str]:
    """The string constants a backend compares the variable `name` with (`if name == "x": ...`), in source order.

    Some choices are only checked in code (trl's DPO `loss_type`): reading them from the installed source keeps
    the list true for whatever version is installed, without importing it.
    """
    found = importlib.util.find_spec(module)
    if found is None or not found.origin:
        raise ImportError(f"cannot find {module}")
    tree = ast.parse(Path(found.origin).read_text(encoding="utf-8"))
    values: list[str] = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == name
                and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq)
                and isinstance(node.comparators[0], ast.Constant) and isinstance(node.comparators[0].value, str)):
            if node.comparators[0].value not in values:
                values.append(node.comparators[0].value)
    return values
