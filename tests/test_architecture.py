"""The import rules that keep the layout readable (AGENTS.md, "Layout"): read from the real source with ast,
function-level imports included, so a lazy import cannot hide a broken rule.

    self_model/core/        knows no stage, no template, no tool: only the libraries
    self_model/template/    the chat-template code: core only
    a stage package         (pretrain, fine_tuning, rlhf) core and template, never another stage
    tokenizer/, data_process/   core and template, never a stage
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("self_model.pretrain", "self_model.fine_tuning", "self_model.rlhf")
SHARED = ("self_model.core", "self_model.template")


def package_of(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:2]) if parts[0] == "self_model" else parts[0]


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every import of the file, at any depth; relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = path.relative_to(root).with_suffix("").parts
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = ".".join([*here[: len(here) - node.level], *([module] if module else [])])
            found.append((node.lineno, module))
            # `from self_model import fine_tuning` names a package too
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if module == "self_model"]
    return found


def allowed(importer: str, module: str) -> bool:
    """Whether package `importer` may import `module` (only project modules are judged)."""
    project = module.split(".")[0] in ("self_model", "tokenizer", "data_process")
    if not project:
        return True
    target = ".".join(module.split(".")[:2]) if module.startswith("self_model.") else module.split(".")[0]
    if module == "self_model":
        return True
    if importer == "self_model.core":
        return target == "self_model.core"
    if importer == "self_model.template":
        return target in SHARED
    if importer in STAGES:
        return target in SHARED or target == importer
    if importer in ("tokenizer", "data_process"):
        return target in SHARED or target == importer
    return True  # entry-level tools (self_model/tools) may combine stages


def violations(root: Path) -> list[str]:
    bad = []
    files = sorted(p for folder in ("self_model", "tokenizer", "data_process") for p in (root / folder).rglob("*.py"))
    for path in files:
        importer = package_of(path, root)
        for line, module in imported_modules(path, root):
            if not allowed(importer, module):
                bad.append(f"{path.relative_to(root)}:{line}: {importer} imports {module}")
    return bad


def test_core_stages_and_template_keep_their_import_rules() -> None:
    bad = violations(ROOT)
    assert not bad, "import rules broken (AGENTS.md, 'Layout'):\n" + "\n".join(bad)


def test_the_guard_catches_each_kind_of_broken_rule(tmp_path: Path) -> None:
    """Plant one bad import of each kind in a copy of the layout: each is reported with file, line and module."""
    planted = {
        "self_model/core/bad_core.py": "from self_model.fine_tuning.data import build_sft_dataset\n",
        "self_model/rlhf/bad_stage.py": "def f():\n    from self_model.fine_tuning import data\n",
        "self_model/template/bad_template.py": "import self_model.pretrain.trainer\n",
        "tokenizer/bad_tool.py": "from self_model.pretrain.config import PretrainConfig\n",
        "self_model/fine_tuning/fine.py": "from self_model.core.run import save_final\nfrom . import data\n",
    }
    for rel, text in planted.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert violations(tmp_path) == [
        "self_model/core/bad_core.py:1: self_model.core imports self_model.fine_tuning.data",
        "self_model/rlhf/bad_stage.py:2: self_model.rlhf imports self_model.fine_tuning",
        "self_model/template/bad_template.py:1: self_model.template imports self_model.pretrain.trainer",
        "tokenizer/bad_tool.py:1: tokenizer imports self_model.pretrain.config",
    ]


def test_core_stays_small() -> None:
    """The core holds only what every stage shares (AGENTS.md); a stage's code belongs in its package."""
    lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in (ROOT / "self_model" / "core").glob("*.py"))
    assert lines < 4000, f"self_model/core has {lines} lines: move stage-specific code into its stage package"
