"""Schema migrations: alembic driven from code, and the URL rules shared with ``alembic``.

The alembic environment and its revisions are package data (``migrations/`` next to this
module), so an installed gateway finds them from any working directory, without the source
tree. The repository's ``alembic.ini`` points at the same folder for plain ``alembic upgrade
head``. ``migrations/env.py`` resolves its URL with ``resolve_url`` below, so that both
commands agree on which database they touch.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import URL, Connection, Engine, create_engine, make_url, pool

from .records import StoreNotAtHead

# A wheel installs packages as plain directories, and alembic reads its scripts from files.
MIGRATIONS_DIR = Path(str(resources.files("component.store") / "migrations"))

DEFAULT_URL = "sqlite:///sipxmpp.db"
URL_ENV = "SIPXMPP_DATABASE__URL"
CONFIG_ENV = "SIPXMPP_CONFIG"
DEFAULT_CONFIG_FILE = "gateway.toml"
UPGRADE_COMMAND = "sipxmpp db upgrade"
ALEMBIC_COMMAND = "alembic upgrade head"


def resolve_url(
    x_url: str | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> str:
    """The database URL: ``-x url=``, else $SIPXMPP_DATABASE__URL, else the config file's
    ``[database] url`` ($SIPXMPP_CONFIG or ./gateway.toml), else ``sqlite:///sipxmpp.db``."""
    env = os.environ if environ is None else environ
    if x_url:
        return x_url
    if env.get(URL_ENV):
        return env[URL_ENV]
    base = Path.cwd() if cwd is None else cwd
    named = env.get(CONFIG_ENV)
    config_file = base / (named or DEFAULT_CONFIG_FILE)
    if named or config_file.is_file():
        # An explicitly named file that is missing or broken is an error, not a silent default.
        with config_file.open("rb") as handle:
            database = tomllib.load(handle).get("database", {})
        url = database.get("url") if isinstance(database, dict) else None
        if isinstance(url, str) and url:
            return url
    return DEFAULT_URL


def engine_url(url: str) -> URL:
    """``url`` with the driver we ship filled in.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, but the gateway depends on
    psycopg2, so operators' plain URLs would fail to load a driver without this.
    """
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        return parsed.set(drivername="postgresql+psycopg2")
    return parsed


def alembic_config(url: str | None = None) -> Config:
    """An alembic ``Config`` for the shipped revisions, usable from any working directory.

    With ``url``, env.py migrates that database. There is no ini file, so env.py leaves the
    caller's logging alone.
    """
    config = Config()
    # ConfigParser interpolates '%', so a path containing one must be escaped.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if url is not None:
        config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (``alembic upgrade head``)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Downgrade the database at ``url`` to ``revision`` (``base`` drops every table)."""
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str:
    """The newest revision in ``migrations/versions``: what this code expects."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no alembic revisions under {MIGRATIONS_DIR}")
    return head


def _revision_of(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def current_revision(url: str | Engine) -> str | None:
    """The revision the database is at, or None for a database never migrated."""
    if isinstance(url, Engine):
        with url.connect() as connection:
            return _revision_of(connection)
    engine = create_engine(engine_url(url), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return _revision_of(connection)
    finally:
        engine.dispose()


def check_at_head(url: str | Engine) -> None:
    """Raise ``StoreNotAtHead``, naming the command to run, unless the schema is at head."""
    current = current_revision(url)
    head = head_revision()
    if current == head:
        return
    shown = (url.url if isinstance(url, Engine) else make_url(url)).render_as_string(
        hide_password=True
    )
    state = "has no schema" if current is None else f"is at revision {current}"
    raise StoreNotAtHead(
        f"database {shown} {state}, this gateway needs revision {head}: "
        f"run `{UPGRADE_COMMAND}` (or `{ALEMBIC_COMMAND}` from the repository root)"
    )
