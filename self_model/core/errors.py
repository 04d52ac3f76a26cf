"""User-facing errors: each says what is wrong, where, what is allowed and how to fix it.

Entry scripts catch `UserError` at the top (see `cli.run_main`), print it without a traceback and
exit non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: bad config, bad data, a missing file, a finished run in the way."""

    exit_code = 1


class ConfigError(UserError):
    """Every config problem found in one pass, each as 'yaml.path: message'."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        head = f"config error in {source}:" if source else "config error:"
        super().__init__("\n".join([head, *(f"  {p}" for p in self.problems)]))


class DataError(UserError):
    """Bad training data; the message names file:line for each of the first problems."""

    exit_code = 3

    def __init__(self, problems: list[str], total: int | None = None, hint: str | None = None):
        self.problems = list(problems)
        total = total if total is not None else len(problems)
        shown = f", first {len(problems)} shown:" if total > len(problems) else ":"
        lines = [f"data error: {total} problem(s){shown}"]
        lines += [f"  {p}" for p in self.problems]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))
