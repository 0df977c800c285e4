"""Plain value classes for the boot path, without ``dataclasses``.

``dataclasses`` imports ``inspect`` (and with it ``ast``, ``dis``,
``tokenize``) and generates code with ``exec`` for every decorated class:
10-15 ms before the first guest instruction, more than the whole budget of
issue 3. A record here is an ordinary class: its fields, in constructor
order, are its ``__slots__``, and it writes its own ``__init__``. The base
classes add what the dataclasses gave and callers rely on: ``==``, a
readable ``repr``, ``replace(**changes)`` and, for frozen records, ``hash``
and read-only fields.
"""

from __future__ import annotations

# Bytes longer than this show as "<N bytes>" in a repr: a chunk of guest
# memory would otherwise print kilobytes.
_REPR_BYTES = 32


def _make(cls, values):
    """Rebuild a record from its field values (copy and pickle use this)."""
    obj = object.__new__(cls)
    for name, value in zip(cls._fields, values, strict=True):
        object.__setattr__(obj, name, value)
    return obj


class Record:
    """A mutable record: ``==`` and ``repr`` over its fields, unhashable
    (as a non-frozen dataclass is). Fields whose name starts with ``_``
    (caches) are compared but not shown."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()
    __hash__ = None  # type: ignore[assignment]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__slots__", ())
        if isinstance(own, str):
            own = (own,)
        cls._fields = cls._fields + tuple(own)
        cls.__match_args__ = tuple(n for n in cls._fields if not n.startswith("_"))

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __repr__(self) -> str:
        parts = []
        for name in self._fields:
            if name.startswith("_"):
                continue
            value = getattr(self, name)
            if isinstance(value, bytes | bytearray) and len(value) > _REPR_BYTES:
                text = f"<{len(value)} bytes>"
            else:
                text = repr(value)
            parts.append(f"{name}={text}")
        return f"{self.__class__.__name__}({', '.join(parts)})"

    def replace(self, **changes) -> Record:
        """A copy with some fields changed (what ``dataclasses.replace`` did)."""
        unknown = changes.keys() - set(self._fields)
        if unknown:
            raise TypeError(
                f"{self.__class__.__name__} has no field {', '.join(sorted(unknown))}"
            )
        values = [changes.get(name, getattr(self, name)) for name in self._fields]
        return _make(self.__class__, values)

    __replace__ = replace  # copy.replace() (Python 3.13)

    def __reduce__(self):
        return _make, (self.__class__, self._values())


class FrozenRecord(Record):
    """An immutable record, hashable by value (as a frozen dataclass is).

    ``__init__`` sets its fields with ``self._init(v1, v2, ...)`` in field order.
    """

    __slots__ = ()

    def _init(self, *values) -> None:
        for name, value in zip(self._fields, values, strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{self.__class__.__name__} is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{self.__class__.__name__} is immutable: cannot delete {name!r}")

    def __hash__(self) -> int:
        return hash(self._values())
