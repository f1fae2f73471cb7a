"""Speed-ups for the SIP hot path: a cheaper ``__init__`` for frozen slotted dataclasses and
small bounded memo tables for pure value parsers.

Both exist because a message goes through several layers (framing, transactions, validation,
the application) that each build small frozen objects and parse the same header values; the
measurements are in ``bench/hotpath.py``. Nothing here knows about SIP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, fields
from inspect import signature
from typing import TypeVar, cast

from sipside.errors import LocalError

_T = TypeVar("_T")
_C = TypeVar("_C")

# Bounded memo tables for pure value parsers (Via, name-addr, CSeq, header keys), keyed by the
# header value. One message is looked at by several layers (transactions, validation, the
# application) that each parse the same Via, From and To; a str caches its own hash, so a hit
# costs one dict lookup. Long values are not kept and a full table is simply emptied, so the
# memory stays bounded whatever peers send. Parse errors are never cached: they raise each time.
# The tables are small on purpose: the hits that matter come while one message goes through the
# layers, and a large table keeps thousands of parsed objects alive for the garbage collector
# to walk (measured: 32 entries beat both 512 and 4096 by several microseconds a message).
MEMO_SIZE = 32
_MEMO_MAX_VALUE = 512


def remember(table: dict[str, _T], key: str, value: _T, size: int = MEMO_SIZE) -> None:
    """Store ``value`` under ``key`` in a memo table, unless the key is long; a full table is
    emptied first."""
    if len(key) <= _MEMO_MAX_VALUE:
        if len(table) >= size:
            table.clear()
        table[key] = value


def slot_setter(cls: type, name: str) -> Callable[[object, object], None]:
    """The slot's own setter: what object.__setattr__ ends up calling, without its checks."""
    setter: Callable[[object, object], None] = cls.__dict__[name].__set__
    return setter


def _parameters(function: Callable[..., object]) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in signature(function).parameters.values()]


def fast_frozen_init(cls: type[_C]) -> type[_C]:
    """Give a frozen, slotted dataclass an ``__init__`` that stores into the slots directly.

    The generated ``__init__`` of a frozen dataclass goes through ``object.__setattr__`` for
    every field, which costs several times a plain slot store; the SIP hot path builds a dozen
    such objects per message. The replacement has the same signature and defaults and calls
    ``__post_init__`` the same way; fields with a default_factory or kw_only (and InitVars) are
    not supported. Slots of base classes that are not fields (private caches) start as None.

    Compiled (sipside/__init__.py), a dataclass's generated methods stay interpreted: its
    ``__init__`` sets each field through ``object.__setattr__`` (about 0.8 us for four fields,
    twice the pure-Python cost with this function's init). A hot class therefore writes its
    own ``__init__`` in the class body (``@dataclass(init=False)``), which mypyc compiles to
    plain slot stores; in pure Python that body would trip the frozen ``__setattr__``, so it is
    replaced here, after checking it takes the same parameters as the fields.
    """
    if "__mypyc_attrs__" in cls.__dict__:
        return cls  # compiled: its own __init__ (or the dataclass's) stays
    params: list[str] = []
    lines: list[str] = []
    namespace: dict[str, object] = {}
    specs = fields(cls)  # type: ignore[arg-type]
    names = {spec.name for spec in specs}
    for base in cls.__mro__[1:]:
        for name in base.__dict__.get("__slots__", ()):
            if name not in names and not name.startswith("__"):
                namespace[f"_set_{name}"] = slot_setter(base, name)
                lines.append(f"    _set_{name}(self, None)")
    for spec in specs:
        name = spec.name
        if spec.default_factory is not MISSING or spec.kw_only is True:
            raise LocalError(
                f"{cls.__name__}.{name}: default_factory and kw_only are not supported"
            )
        # The slot is the class's own, or a base dataclass's whose fields it inherits.
        owner = next(base for base in cls.__mro__ if name in base.__dict__)
        namespace[f"_set_{name}"] = slot_setter(owner, name)
        if spec.default is not MISSING:
            namespace[f"_default_{name}"] = spec.default
        if spec.init:
            params.append(name if spec.default is MISSING else f"{name}=_default_{name}")
            lines.append(f"    _set_{name}(self, {name})")
        elif spec.default is not MISSING:
            lines.append(f"    _set_{name}(self, _default_{name})")
    if hasattr(cls, "__post_init__"):
        lines.append("    self.__post_init__()")
    source = f"def __init__(self, {', '.join(params)}):\n" + "\n".join(lines or ["    pass"])
    exec(source, namespace)
    init = namespace["__init__"]
    own: Callable[..., object] | None = cls.__dict__.get("__init__")
    made = cast(Callable[..., object], init)
    if own is not None and _parameters(own) != _parameters(made):
        raise LocalError(
            f"{cls.__name__}.__init__{signature(own)} does not take the fields as {signature(made)}"
        )
    init.__qualname__ = f"{cls.__qualname__}.__init__"  # type: ignore[attr-defined]
    setattr(cls, "__init__", init)  # noqa: B010 - mypy forbids assigning to a method
    return cls
