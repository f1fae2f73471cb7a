"""Row <-> record mapping, written once: a record's fields are the columns of the same name.

A ``RowMapping`` pairs a ``records`` dataclass with its table and converts by column type:
``UTCDateTime`` columns hold aware datetimes where records carry POSIX seconds, ``JsonText``
columns hand back a fresh dict; every other column holds the record's value as it is. Columns a
record does not have (``queued_message.finished_at``) are the store's own business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from datetime import UTC, datetime
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

from sqlalchemy import ColumnElement, Table, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import KeyedColumnElement
from sqlmodel import SQLModel

from .models import JsonText, UTCDateTime

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

R = TypeVar("R", bound="DataclassInstance")


def to_datetime(ts: float) -> datetime:
    """POSIX seconds -> aware UTC datetime, the form the columns hold."""
    return datetime.fromtimestamp(ts, UTC)


def to_timestamp(value: datetime) -> float:
    """Aware datetime -> POSIX seconds, the form records carry."""
    return value.timestamp()


class _Codec(NamedTuple):
    """How one column's value goes into the database (``dump``) and comes back (``load``)."""

    dump: Callable[[Any], Any]
    load: Callable[[Any], Any]


def _unchanged(value: Any) -> Any:
    return value


def _nullable(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else convert(value)


_PLAIN = _Codec(_unchanged, _unchanged)
_TIME = _Codec(_nullable(to_datetime), _nullable(to_timestamp))
_JSON = _Codec(_nullable(dict), _nullable(dict))


def _codec(column: KeyedColumnElement[Any]) -> _Codec:
    match column.type:
        case UTCDateTime():
            return _TIME
        case JsonText():
            return _JSON
        case _:
            return _PLAIN


class RowMapping(Generic[R]):
    """One record type on one table, with the statements every record type needs."""

    def __init__(self, record: type[R], model: type[SQLModel]) -> None:
        self.record = record
        self.model = model
        self.table: Table = model.__table__  # type: ignore[attr-defined]
        self.key_names = tuple(column.name for column in self.table.primary_key.columns)
        self._sort_key = attrgetter(*self.key_names)
        self._column_codecs = {column.name: _codec(column) for column in self.table.c}
        self._codecs = [(field.name, self._column_codecs[field.name]) for field in fields(record)]

    def column(self, name: str) -> KeyedColumnElement[Any]:
        """The column ``name`` of the table, for a statement's WHERE or ORDER BY."""
        return self.table.c[name]

    def to_record(self, row: Any) -> R:
        """The record of a result row (ORM row or Core row: both have the column names)."""
        return self.record(**{name: codec.load(getattr(row, name)) for name, codec in self._codecs})

    def to_values(self, record: DataclassInstance) -> dict[str, Any]:
        """The column values of ``record``, or of any dataclass whose fields are columns of the
        table (a ``NewMessage``: a queued message's fields but those the queue sets itself)."""
        codecs = self._column_codecs
        return {f.name: codecs[f.name].dump(getattr(record, f.name)) for f in fields(record)}

    def matching(self, **equal: Any) -> list[ColumnElement[bool]]:
        """``column == value`` for each given value that is not None (None: any value)."""
        return [self.table.c[name] == value for name, value in equal.items() if value is not None]

    def expired_by(self, when: float | None) -> list[ColumnElement[bool]]:
        """``expires_at <= when`` (a NULL expiry never matches); no condition when None."""
        return [] if when is None else [self.table.c.expires_at <= to_datetime(when)]

    def _where_key(self, key: Sequence[Any]) -> list[ColumnElement[bool]]:
        return [
            self.table.c[name] == value for name, value in zip(self.key_names, key, strict=True)
        ]

    def upsert(self, session: Session, record: R, **extra: Any) -> None:
        """Insert or replace ``record``'s row; ``extra`` sets columns the record does not have
        (the owner instance)."""
        upsert(session, self.model, self.to_values(record) | extra, self.key_names)

    def get(self, session: Session, *key: Any) -> R | None:
        """The record with primary key ``key``, if stored."""
        row = session.execute(select(self.table).where(*self._where_key(key))).first()
        return None if row is None else self.to_record(row)

    def select(
        self,
        session: Session,
        *where: ColumnElement[bool],
        order_by: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[R]:
        """Records of the rows matching ``where``, ordered by ``order_by`` (default: the key)."""
        order = [self.table.c[name] for name in order_by or self.key_names]
        stmt = select(self.table).where(*where).order_by(*order).limit(limit)
        return [self.to_record(row) for row in session.execute(stmt)]

    def returning(self, session: Session, stmt: Any) -> list[R]:
        """Run an UPDATE or DELETE and return the records of its rows, ordered by key."""
        rows = session.execute(stmt.returning(*self.table.c)).all()
        return sorted((self.to_record(row) for row in rows), key=self._sort_key)

    def delete(self, session: Session, *key: Any) -> bool:
        """Delete the row with primary key ``key``; False if there was none."""
        stmt = delete(self.table).where(*self._where_key(key))
        return len(session.execute(stmt.returning(*self.table.primary_key.columns)).all()) > 0

    def delete_where(self, session: Session, *where: ColumnElement[bool]) -> int:
        """Delete the rows matching ``where``; returns how many."""
        stmt = delete(self.table).where(*where).returning(*self.table.primary_key.columns)
        return len(session.execute(stmt).all())

    def count(self, session: Session, *where: ColumnElement[bool]) -> int:
        """How many rows match ``where``."""
        stmt = select(func.count()).select_from(self.table).where(*where)
        return int(session.execute(stmt).scalar_one())


def upsert(
    session: Session, model: type[SQLModel], values: dict[str, Any], keys: Sequence[str]
) -> None:
    """Insert or update one row in one statement, so concurrent instances cannot collide."""
    table = model.__table__  # type: ignore[attr-defined]
    changed = {k: v for k, v in values.items() if k not in keys}
    match session.get_bind().dialect.name:
        case "postgresql":
            pg = postgresql.insert(table).values(values)
            session.execute(pg.on_conflict_do_update(index_elements=list(keys), set_=changed))
        case "sqlite":
            lite = sqlite.insert(table).values(values)
            session.execute(lite.on_conflict_do_update(index_elements=list(keys), set_=changed))
        case _:
            # Other backends: the ORM's read-then-write; fine for a single instance.
            session.merge(model(**values))
