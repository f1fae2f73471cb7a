"""The sipxmpp command line (and log setup): config discovery, check-config, run, db."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from component import cli
from component.logs import REDACTED, configure_logging, debug_enabled, get_logger, parse_level
from component.settings import Settings

GOOD = '[xmpp]\ncomponent = "gw.example.org"\nsecret = "hunter2"\n'
BAD = (
    '[xmpp]\nport = 70000\nsecret = "hunter2"\n'
    '[sip]\nlisten = ["udp:127.0.0.1:5070", "sctp:1.2.3.4:5"]\ndelimiter = "ab"\n'
    "[limits]\nworkers = 0\n"
)
BAD_KEYS = ["xmpp.port", "sip.listen[1]", "sip.delimiter", "limits.workers"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.upper().startswith("SIPXMPP_"):
            monkeypatch.delenv(name)
    # configure_logging owns the process's logging; give pytest its handlers back afterwards.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def run_module(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("SIPXMPP_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "component", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --- where the configuration comes from ---------------------------------------------------------

RESOLVE = [
    # (-c value, gateway.toml in cwd, $SIPXMPP_CONFIG, expected relative to tmp)
    ("given.toml", True, "env.toml", "given.toml"),
    (None, True, "env.toml", "env.toml"),
    (None, True, None, "gateway.toml"),
    (None, False, "env.toml", "env.toml"),
    (None, False, None, None),
    (None, False, "", None),
]


@pytest.mark.parametrize(("given", "in_cwd", "env", "expected"), RESOLVE)
def test_resolve_config_path(
    tmp_path: Path, given: str | None, in_cwd: bool, env: str | None, expected: str | None
) -> None:
    if in_cwd:
        (tmp_path / "gateway.toml").write_text("")
    environ = {} if env is None else {"SIPXMPP_CONFIG": str(tmp_path / env) if env else ""}
    given_path = str(tmp_path / given) if given else None
    result = cli.resolve_config_path(given_path, tmp_path, environ)
    assert result == (tmp_path / expected if expected else None)


# --- argument parsing ---------------------------------------------------------------------------

PARSE = [
    (["run"], cli.cmd_run, None),
    (["run", "-c", "x.toml"], cli.cmd_run, "x.toml"),
    (["check-config", "--config", "y.toml"], cli.cmd_check_config, "y.toml"),
    (["db", "upgrade", "-c", "z.toml"], cli.cmd_db_upgrade, "z.toml"),
    (["db", "current"], cli.cmd_db_current, None),
]


@pytest.mark.parametrize(("argv", "command", "config"), PARSE)
def test_parse(argv: list[str], command: object, config: str | None) -> None:
    args = cli.build_parser().parse_args(argv)
    assert (args.command, args.config) == (command, config)


@pytest.mark.parametrize("argv", [[], ["db"], ["frobnicate"], ["run", "--log-level", "loud"]])
def test_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(argv)
    assert caught.value.code == 2


# --- check-config, as an operator runs it -------------------------------------------------------


def test_check_config_ok(tmp_path: Path) -> None:
    (tmp_path / "good.toml").write_text(GOOD)
    result = run_module("check-config", "-c", "good.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config OK")
    assert "gw.example.org" in result.stdout
    assert "hunter2" not in result.stdout + result.stderr


def test_check_config_bad(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text(BAD)
    result = run_module("check-config", "-c", "bad.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for key in BAD_KEYS:
        assert f"  {key}: " in result.stderr
    assert "must be 1-65535" in result.stderr
    assert "hunter2" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(None, "no such file"), ("[xmpp\n", "not valid TOML"), (b"\xff\xfe[x]", "not valid TOML")],
)
def test_check_config_unreadable(
    tmp_path: Path, content: str | bytes | None, fragment: str
) -> None:
    path = tmp_path / "cfg.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    result = run_module("check-config", "-c", "cfg.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert fragment in result.stderr and "Traceback" not in result.stderr


def test_check_config_environment_error(tmp_path: Path) -> None:
    result = run_module("check-config", cwd=tmp_path, env={"SIPXMPP_XMPP__PORT": "0"})
    assert result.returncode == 2
    assert "xmpp.port: must be 1-65535" in result.stderr


def test_check_config_finds_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["check-config"]) == 0
    assert "defaults" in capsys.readouterr().out
    (tmp_path / "elsewhere.toml").write_text(GOOD)
    monkeypatch.setenv("SIPXMPP_CONFIG", str(tmp_path / "elsewhere.toml"))
    assert cli.main(["check-config"]) == 0
    assert "gw.example.org" in capsys.readouterr().out
    (tmp_path / "gateway.toml").write_text(BAD)
    assert cli.main(["check-config"]) == 0  # $SIPXMPP_CONFIG wins over ./gateway.toml
    capsys.readouterr()
    monkeypatch.delenv("SIPXMPP_CONFIG")
    assert cli.main(["check-config"]) == 2
    assert "xmpp.port" in capsys.readouterr().err


# --- run and db: the commands hand the validated settings to the other modules ------------------


def test_run_calls_app_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Settings] = []

    def fake_main(settings: Settings) -> int:
        seen.append(settings)
        return 7

    monkeypatch.setitem(sys.modules, "component.app", types.SimpleNamespace(main=fake_main))
    monkeypatch.setattr("component.logs.configure_logging", lambda *a, **k: None)
    (tmp_path / "good.toml").write_text(GOOD)
    assert cli.main(["run", "-c", str(tmp_path / "good.toml")]) == 7
    assert [s.xmpp.component for s in seen] == ["gw.example.org"]


def test_run_refuses_bad_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[object] = []
    monkeypatch.setitem(sys.modules, "component.app", types.SimpleNamespace(main=called.append))
    (tmp_path / "bad.toml").write_text(BAD)
    assert cli.main(["run", "-c", str(tmp_path / "bad.toml")]) == 2
    assert called == []


def test_db_commands_use_configured_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import component.store.migrate as migrate

    urls: list[str] = []
    monkeypatch.setattr(migrate, "upgrade", urls.append)

    def current_revision(url: str) -> str:
        urls.append(url)
        return "0001"

    monkeypatch.setattr(migrate, "current_revision", current_revision)
    monkeypatch.setattr(migrate, "head_revision", lambda: "0002")
    url = "postgresql://gw:pw@db.example/sipxmpp"
    (tmp_path / "db.toml").write_text(f'[database]\nurl = "{url}"\n')
    assert cli.main(["db", "upgrade", "-c", str(tmp_path / "db.toml")]) == 0
    assert cli.main(["db", "current", "-c", str(tmp_path / "db.toml")]) == 0
    assert urls == [url, url]
    out = capsys.readouterr().out
    assert "current: 0001" in out and "head: 0002" in out
    assert ":pw@" not in out


# --- logs ---------------------------------------------------------------------------------------


@pytest.fixture
def json_log() -> io.StringIO:
    stream = io.StringIO()
    configure_logging("info", json=True, stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_redact_secrets(json_log: io.StringIO) -> None:
    log = get_logger("test", call_id="abc")
    log.info("component_connected", secret="s3", db_password="p4", nested={"Password": "x", "a": 1})
    log.debug("too_detailed")
    [event] = lines(json_log)
    assert event["event"] == "component_connected" and event["level"] == "info"
    assert (event["logger_name"], event["call_id"]) == ("test", "abc")
    assert event["secret"] == event["db_password"] == REDACTED
    assert event["nested"] == {"Password": REDACTED, "a": 1}


def test_stdlib_loggers_share_the_format(json_log: io.StringIO) -> None:
    logging.getLogger("slixmpp.test").warning("stream %s", "closed")
    [event] = lines(json_log)
    assert (event["event"], event["logger_name"], event["level"]) == (
        "stream closed",
        "slixmpp.test",
        "warning",
    )


def test_console_renderer_when_asked() -> None:
    stream = io.StringIO()
    configure_logging("debug", json=False, stream=stream)
    get_logger("t").debug("queue_drained", secret="zzz", depth=3)
    text = stream.getvalue()
    assert "queue_drained" in text and "depth=3" in text and "zzz" not in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize(
    ("level", "rendered"), [("info", False), ("debug", True), ("error", False)]
)
def test_debug_enabled_follows_the_configured_level(level: str, rendered: bool) -> None:
    stream = io.StringIO()
    configure_logging(level, json=True, stream=stream)
    get_logger("t").debug("message_relayed")
    assert debug_enabled() is rendered
    assert ("message_relayed" in stream.getvalue()) is rendered
    configure_logging("debug", json=True, stream=io.StringIO())  # the unconfigured default
    assert debug_enabled()


@pytest.mark.parametrize(("name", "level"), [("info", 20), ("DEBUG", 10), (" warning ", 30)])
def test_parse_level(name: str, level: int) -> None:
    assert parse_level(name) == level


def test_parse_level_rejects() -> None:
    with pytest.raises(ValueError, match="loud"):
        parse_level("loud")


def test_db_failure_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import component.store.migrate as migrate

    def broken(url: str) -> None:
        raise RuntimeError(f"cannot reach {url}\nmore detail")

    monkeypatch.setattr(migrate, "upgrade", broken)
    (tmp_path / "db.toml").write_text('[database]\nurl = "postgresql://gw:pw@db.example/x"\n')
    assert cli.main(["db", "upgrade", "-c", str(tmp_path / "db.toml")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "RuntimeError: cannot reach postgresql://gw:***@db.example/x" in err
