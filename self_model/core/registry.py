"""A name -> item registry for things a YAML names (data formats, reward functions): refuses duplicates,
lists the known names (with a did-you-mean) on a miss."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from self_model.core.config import did_you_mean
from self_model.core.errors import UserError
from self_model.core.rows import RowError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._items[name] = item
        return item

    def get(self, name: str, extra_choices: tuple[str, ...] = ()) -> T:
        if name not in self._items:
            known = self.names() + list(extra_choices)
            raise UserError(f"unknown {self.kind} '{name}'{did_you_mean(name, known)}; known: {known}")
        return self._items[name]

    def detect(self, row: dict[str, Any], what: str = "row") -> str:
        """For row formats (items with `detect(row)` and `example`): the first that recognises the row, in
        registration order; else a RowError showing an example of each."""
        for item in self._items.values():
            if item.detect(row):  # type: ignore[attr-defined]
                return item.name  # type: ignore[attr-defined]
        examples = "\n".join(f"    {item.name}: {item.example}" for item in self._items.values())  # type: ignore[attr-defined]
        raise RowError(f"unrecognised {what} with keys {sorted(row)}; expected one of:\n{examples}")

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())

    def __getitem__(self, name: str) -> T:
        return self._items[name]
