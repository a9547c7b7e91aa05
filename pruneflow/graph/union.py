"""The union of channel spaces: one union-find, used by the tracer (spaces joined by an addition, a product, a
residual) and by the cut (reordered spaces cut to one width)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

Key = TypeVar("Key", bound=Hashable)


class UnionFind(Generic[Key]):
    """Disjoint sets of keys; each set is named by its smallest key, so the first space traced names a union."""

    def __init__(self) -> None:
        self.parent: dict[Key, Key] = {}

    def add(self, key: Key) -> Key:
        self.parent.setdefault(key, key)
        return key

    def root(self, key: Key) -> Key:
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]  # path halving: later lookups are shorter
            key = self.parent[key]
        return key

    def union(self, a: Key, b: Key) -> tuple[Key, Key | None]:
        """Join the sets of ``a`` and ``b``: (the root kept, the root merged into it, None if they were one)."""
        a, b = self.root(a), self.root(b)
        if a == b:
            return a, None
        kept, merged = (a, b) if a < b else (b, a)  # type: ignore[operator]
        self.parent[merged] = kept
        return kept, merged

    def is_root(self, key: Key) -> bool:
        return self.root(key) == key
