"""A name -> item registry for things a YAML names (data formats, reward functions): refuses duplicates,
lists the known names (with a did-you-mean) on a miss."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from self_model.core.config import did_you_mean
from self_model.core.errors import UserError

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

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())

    def __getitem__(self, name: str) -> T:
        return self._items[name]
