"""The ``sipxmpp`` command line (DESIGN 9): run, check-config, db upgrade, db current.

Exit status: 0 success, 1 the command failed at run time, 2 bad configuration or usage (the
same status argparse uses). Configuration errors are printed one key per line, never as a
traceback. The application and the store are imported lazily so that ``check-config`` works
on a machine that lacks their optional dependencies.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from component.settings import Settings, SettingsError, load_settings, masked_url

DEFAULT_CONFIG = "gateway.toml"
CONFIG_ENV = "SIPXMPP_CONFIG"
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def resolve_config_path(given: str | None, cwd: Path, environ: Mapping[str, str]) -> Path | None:
    """``-c`` if given, else ``$SIPXMPP_CONFIG``, else ``gateway.toml`` in ``cwd`` if present
    (the same order as the alembic environment uses).

    None means "no file": built-in defaults plus the environment.
    """
    if given:
        return Path(given)
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    if (cwd / DEFAULT_CONFIG).is_file():
        return cwd / DEFAULT_CONFIG
    return None


def summary(settings: Settings, path: Path | None) -> list[str]:
    """Short human description of a valid configuration; never shows secrets."""
    sip = settings.sip
    aliases = ", ".join(f"{domain} ({delim})" for domain, delim in sip.aliases.items())
    return [
        f"file: {path if path is not None else '(none: defaults and environment)'}",
        f"xmpp: component {settings.xmpp.component} via "
        f"{settings.xmpp.host}:{settings.xmpp.port} (secret hidden)",
        f"sip: listen {', '.join(str(spec) for spec in sip.listen)}",
        f"sip: domain {sip.domain}, jdomain {sip.jdomain} (delimiter {sip.delimiter})",
        f"sip: aliases {aliases or '(none)'}",
        f"sip: proxy {sip.proxy or '(none: direct)'}, registrar {sip.registrar}",
        f"database: {masked_url(settings.database.url)}",
        f"metrics: {settings.metrics.listen or 'off'}",
    ]


def _load(args: argparse.Namespace, err: TextIO) -> tuple[Settings, Path | None] | None:
    path = resolve_config_path(args.config, Path.cwd(), os.environ)
    try:
        return load_settings(path), path
    except SettingsError as exc:
        print(f"config error{f' in {path}' if path else ''}:", file=err)
        for key, message in exc.errors:
            print(f"  {key}: {message}", file=err)
        return None


def _unavailable(args: argparse.Namespace, exc: ImportError, err: TextIO) -> int:
    print(f"sipxmpp {args.name}: not available: {exc}", file=err)
    return EXIT_FAILED


def _failed(args: argparse.Namespace, exc: Exception, err: TextIO) -> int:
    text = masked_url(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    print(f"sipxmpp {args.name}: {type(exc).__name__}: {text}", file=err)
    return EXIT_FAILED


Command = Callable[[argparse.Namespace, TextIO, TextIO], int]
ConfiguredCommand = Callable[[argparse.Namespace, Settings, "Path | None", TextIO, TextIO], int]


def _configured(command: ConfiguredCommand) -> Command:
    """``command`` run with the loaded configuration; a bad one exits with EXIT_CONFIG."""

    @functools.wraps(command)
    def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
        loaded = _load(args, err)
        if loaded is None:
            return EXIT_CONFIG
        settings, path = loaded
        return command(args, settings, path, out, err)

    return run


@_configured
def cmd_check_config(
    args: argparse.Namespace, settings: Settings, path: Path | None, out: TextIO, err: TextIO
) -> int:
    """Validate the configuration and print a summary, or every bad key."""
    print("config OK", file=out)
    for line in summary(settings, path):
        print(f"  {line}", file=out)
    return EXIT_OK


@_configured
def cmd_run(
    args: argparse.Namespace, settings: Settings, path: Path | None, out: TextIO, err: TextIO
) -> int:
    """Run the gateway until it is told to stop."""
    import sipside
    from component.logs import configure_logging, get_logger

    configure_logging(args.log_level, json=args.log_json)
    get_logger(__name__).info(
        "gateway_starting",
        config=str(path) if path else None,
        component=settings.xmpp.component,
        sip_stack="compiled" if sipside.NATIVE else "pure Python",
    )
    try:
        from component.app import main as app_main
    except ImportError as exc:
        return _unavailable(args, exc, err)
    return app_main(settings)


@_configured
def cmd_db_upgrade(
    args: argparse.Namespace, settings: Settings, path: Path | None, out: TextIO, err: TextIO
) -> int:
    """Bring the database schema to the newest alembic revision."""
    try:
        from component.store.migrate import upgrade
    except ImportError as exc:
        return _unavailable(args, exc, err)
    url = settings.database.url
    try:
        upgrade(url)
    except Exception as exc:  # the CLI edge: one line for the operator, not a traceback
        return _failed(args, exc, err)
    print(f"database {masked_url(url)} upgraded to head", file=out)
    return EXIT_OK


@_configured
def cmd_db_current(
    args: argparse.Namespace, settings: Settings, path: Path | None, out: TextIO, err: TextIO
) -> int:
    """Print the database's current schema revision and the newest one."""
    try:
        from component.store.migrate import current_revision, head_revision
    except ImportError as exc:
        return _unavailable(args, exc, err)
    try:
        current = current_revision(settings.database.url)
        head = head_revision()
    except Exception as exc:  # the CLI edge: one line for the operator, not a traceback
        return _failed(args, exc, err)
    print(f"current: {current or '(empty database)'}", file=out)
    print(f"head: {head}", file=out)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each sub-command sets ``command`` to its function."""
    parser = argparse.ArgumentParser(
        prog="sipxmpp", description="SIP <-> XMPP gateway (XMPP component, XEP-0114)"
    )
    commands = parser.add_subparsers(dest="name", required=True, metavar="COMMAND")

    def add(
        sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, command: Command
    ) -> argparse.ArgumentParser:
        child = sub.add_parser(name, help=(command.__doc__ or "").splitlines()[0])
        child.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            help=f"TOML file (default: ./{DEFAULT_CONFIG} if present, else ${CONFIG_ENV})",
        )
        child.set_defaults(command=command)
        return child

    run = add(commands, "run", cmd_run)
    run.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"]
    )
    run.add_argument(
        "--log-json",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="JSON log lines (default: only when stderr is not a terminal)",
    )
    add(commands, "check-config", cmd_check_config)
    db = commands.add_parser("db", help="database schema (alembic)")
    db_commands = db.add_subparsers(dest="db_name", required=True, metavar="DB_COMMAND")
    add(db_commands, "upgrade", cmd_db_upgrade)
    add(db_commands, "current", cmd_db_current)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sipxmpp`` and ``python -m component``; returns the exit status."""
    args = build_parser().parse_args(argv)
    command: Command = args.command
    try:
        return command(args, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        return 130
