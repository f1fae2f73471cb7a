"""Alembic migrations: the CLI from the repository root, the programmatic API, and the schema
they make compared with the models, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlalchemy.pool import NullPool

from component.store import Store, StoreNotAtHead, migrate
from component.store.migrate import engine_url
from component.store.models import metadata
from tests.test_store import scratch_postgres_database

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with nothing in it, on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    with scratch_postgres_database("sipxmpp_migr") as url:
        yield url


def _alembic(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIPXMPP_")}
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=REPO_ROOT,
        env=clean | (env or {}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _tables(url: str) -> set[str]:
    engine = create_engine(engine_url(url), poolclass=NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _schema_diff(url: str) -> list[object]:
    engine = create_engine(engine_url(url), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def test_alembic_cli_upgrade_head_from_repository_root(empty_url: str) -> None:
    result = _alembic("-x", f"url={empty_url}", "upgrade", "head")
    assert result.returncode == 0, result.stderr
    assert migrate.current_revision(empty_url) == migrate.head_revision()
    assert set(metadata.tables) <= _tables(empty_url)
    assert _schema_diff(empty_url) == []  # the revisions build exactly what the models say


def test_programmatic_upgrade_from_any_directory_then_downgrade(
    empty_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIPXMPP_DATABASE__URL", "sqlite:///must-not-be-used.db")
    migrate.upgrade(empty_url)
    assert _schema_diff(empty_url) == []
    migrate.check_at_head(empty_url)
    migrate.downgrade(empty_url, "base")
    assert _tables(empty_url) <= {"alembic_version"}
    assert migrate.current_revision(empty_url) is None
    assert not (tmp_path / "must-not-be-used.db").exists()


async def test_check_at_head_names_the_command(empty_url: str) -> None:
    with pytest.raises(StoreNotAtHead) as caught:
        migrate.check_at_head(empty_url)
    message = str(caught.value)
    assert "sipxmpp db upgrade" in message and "alembic upgrade head" in message
    assert "no schema" in message
    with pytest.raises(StoreNotAtHead):
        await Store.open(empty_url)  # the gateway refuses to start on an old schema
    migrate.upgrade(empty_url)
    store = await Store.open(empty_url)
    await store.close()


def test_passwords_stay_out_of_the_message() -> None:
    with scratch_postgres_database("sipxmpp_pw") as url:
        # Trust authentication ignores the password, so it reaches the message-making code.
        with_password = url.replace("postgres@", "postgres:s3cret@")
        with pytest.raises(StoreNotAtHead) as caught:
            migrate.check_at_head(with_password)
    assert "s3cret" not in str(caught.value) and "***" in str(caught.value)


def test_alembic_cli_takes_the_url_from_the_config_file(tmp_path: Path) -> None:
    database = tmp_path / "from-config.db"
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[xmpp]\ncomponent = "sip.xmpp.test"\n[database]\nurl = "sqlite:///{database}"\n'
    )
    result = _alembic("upgrade", "head", env={"SIPXMPP_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    assert migrate.current_revision(f"sqlite:///{database}") == migrate.head_revision()


def test_alembic_cli_offline_sql_has_every_table() -> None:
    result = _alembic("-x", "url=postgresql://nobody@127.0.0.1:1/x", "upgrade", "head", "--sql")
    assert result.returncode == 0, result.stderr
    for table in metadata.tables:
        assert f"CREATE TABLE {table} " in result.stdout


URL_CASES = [
    # (x_url, environment, gateway.toml in cwd, expected)
    pytest.param(
        "sqlite:///x.db",
        {"SIPXMPP_DATABASE__URL": "sqlite:///e.db"},
        True,
        "sqlite:///x.db",
        id="x-wins",
    ),
    pytest.param(
        None,
        {"SIPXMPP_DATABASE__URL": "sqlite:///e.db"},
        True,
        "sqlite:///e.db",
        id="env-over-file",
    ),
    pytest.param(None, {}, True, "postgresql://db/cwd", id="gateway-toml-in-cwd"),
    pytest.param(
        None, {"SIPXMPP_CONFIG": "other.toml"}, True, "postgresql://db/other", id="named-file"
    ),
    pytest.param(None, {}, False, "sqlite:///sipxmpp.db", id="default"),
]


@pytest.mark.parametrize(("x_url", "environ", "has_file", "expected"), URL_CASES)
def test_resolve_url(
    tmp_path: Path, x_url: str | None, environ: dict[str, str], has_file: bool, expected: str
) -> None:
    if has_file:
        (tmp_path / "gateway.toml").write_text('[database]\nurl = "postgresql://db/cwd"\n')
        (tmp_path / "other.toml").write_text('[database]\nurl = "postgresql://db/other"\n')
    assert migrate.resolve_url(x_url, environ, tmp_path) == expected


def test_resolve_url_refuses_a_missing_named_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        migrate.resolve_url(None, {"SIPXMPP_CONFIG": "absent.toml"}, tmp_path)


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg2"),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg2"),
        ("sqlite:///x.db", "sqlite"),
    ],
)
def test_engine_url_fills_in_the_shipped_driver(url: str, driver: str) -> None:
    assert engine_url(url).drivername == driver
