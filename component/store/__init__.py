"""The gateway's durable state: SQLModel tables behind an async, domain-named facade.

The core talks to ``StorePort``; ``Store`` implements it on SQLite or PostgreSQL, and
``memory.MemoryStore`` in memory for core tests. Schema changes are alembic revisions
(``migrate``). The records the port speaks in are re-exported from ``records``.
"""

from . import records
from .migrate import check_at_head, current_revision, head_revision, upgrade
from .port import DEFAULT_LEASE, StorePort
from .records import *  # noqa: F403 (the names are records.__all__, added below)
from .store import Store

__all__ = [
    "DEFAULT_LEASE",
    "Store",
    "StorePort",
    "check_at_head",
    "current_revision",
    "head_revision",
    "upgrade",
]
__all__ += records.__all__
