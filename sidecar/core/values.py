"""The base of the hot path's value records (a candidate's metrics, a proposal, an outcome...).

A record is a class with ``__slots__`` whose fields are set once in ``__init__`` and declared
``Final`` there, so mypy refuses any later assignment; it compares, hashes and prints by value,
like the tuple of its fields. Not a ``NamedTuple`` nor a frozen dataclass: compiled by mypyc
(sidecar/accel.py), a plain class is a native struct, built and read ~8x faster than a
NamedTuple (whose ``__new__`` runs interpreted even from compiled code); as pure Python it is
also the cheaper of the three (a frozen dataclass sets each field through
``object.__setattr__``).
"""

from __future__ import annotations

from typing import ClassVar


class Value:
    """Equality, hash and repr over ``_fields`` (each subclass lists its fields there and uses
    the same tuple as its ``__slots__``)."""

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()

    def values(self) -> tuple[object, ...]:
        """The fields' values, in ``_fields`` order."""
        return tuple([getattr(self, name) for name in self._fields])

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Value)
        return self.values() == other.values()

    def __hash__(self) -> int:
        return hash(self.values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{name}={getattr(self, name)!r}' for name in self._fields)})"
