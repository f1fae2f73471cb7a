"""Alembic environment of the sipxmpp store.

The URL comes from ``component.store.migrate``: a caller's ``Config.attributes["url"]``
(``sipxmpp db upgrade``, tests), else ``-x url=...``, $SIPXMPP_DATABASE__URL, the config
file's ``[database] url``, or ``sqlite:///sipxmpp.db``.
"""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import create_engine, make_url, pool
from sqlalchemy.types import TypeDecorator

from component.store.migrate import engine_url, resolve_url
from component.store.models import metadata

config = context.config

# Only the `alembic` command reads alembic.ini; `sipxmpp db upgrade` keeps its own logging.
if config.config_file_name is not None:
    fileConfig(config.config_file_name)


def database_url() -> str:
    """The URL to migrate, by the precedence in the module docstring."""
    given = config.attributes.get("url")
    if isinstance(given, str) and given:
        return given
    return resolve_url(context.get_x_argument(as_dictionary=True).get("url"))


def render_item(kind: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Autogenerate plain SQLAlchemy types, not our decorators: revisions must not import models."""
    if kind == "type" and isinstance(obj, TypeDecorator):
        return f"sa.{obj.impl_instance!r}"
    return False


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=metadata,
        compare_type=True,
        render_item=render_item,
        **kwargs,
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout (``alembic upgrade head --sql``) without a connection."""
    url = database_url()
    _configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=make_url(url).get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate the database over a connection of its own."""
    url = database_url()
    engine = create_engine(engine_url(url), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            # SQLite cannot ALTER most things in place; batch mode copies the table instead.
            _configure(connection=connection, render_as_batch=engine.dialect.name == "sqlite")
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
