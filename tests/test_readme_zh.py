"""README_zh.md covers everything README.md covers: the same sections in the same order, and every command and every
YAML key the English README documents (so a change to one that is not made in the other fails here)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"^\s*(uv run|uv sync|torchrun|deepspeed|accelerate|python|bash|curl)\b")


def headings(text: str) -> list[int]:
    """The heading levels in order, outside code blocks."""
    levels, in_code = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (match := re.match(r"^(#{1,6}) ", line)):
            levels.append(len(match[1]))
    return levels


def commands(text: str) -> set[str]:
    """Command lines inside code blocks, comments cut, whitespace folded."""
    found, in_code = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif in_code and COMMAND.match(line):
            found.add(" ".join(line.split("  #")[0].split()))
    return found


def table_keys(text: str) -> set[str]:
    """The `key` cells that open a table row (the config references)."""
    return {match[1] for match in re.finditer(r"^\| `([^`]+)`", text, flags=re.M)}


def test_readme_zh_has_the_same_sections() -> None:
    english, chinese = (ROOT / "README.md").read_text(encoding="utf-8"), (ROOT / "README_zh.md").read_text("utf-8")
    assert headings(chinese) == headings(english), "README_zh.md's sections differ from README.md's"


def test_readme_zh_documents_every_command_and_key() -> None:
    english, chinese = (ROOT / "README.md").read_text(encoding="utf-8"), (ROOT / "README_zh.md").read_text("utf-8")
    missing = sorted(commands(english) - commands(chinese))
    assert not missing, "commands in README.md missing from README_zh.md:\n" + "\n".join(missing)
    missing = sorted(table_keys(english) - table_keys(chinese))
    assert not missing, f"table rows in README.md missing from README_zh.md: {missing}"


def test_the_checks_see_a_difference() -> None:
    text = "# a\n\n## b\n\n```bash\nuv run python x.py --config y.yaml  # go\n```\n\n| `k.v` | 1 |\n"
    assert headings(text) == [1, 2] and commands(text) == {"uv run python x.py --config y.yaml"}
    assert table_keys(text) == {"k.v"}
    assert headings(text.replace("## b", "### b")) != headings(text)
