"""Settings: DESIGN 9 keys and defaults, seed string forms, env overrides, keyed errors."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from component.settings import ListenSpec, Settings, SettingsError, load_settings, masked_url

EXAMPLE = Path(__file__).resolve().parents[1] / "gateway.example.toml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith("SIPXMPP_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def errors_of(tmp_path: Path, text: str) -> dict[str, str]:
    with pytest.raises(SettingsError) as caught:
        load_settings(write(tmp_path, text))
    return dict(caught.value.errors)


# DESIGN 9, verbatim: these keys and defaults are the operators' interface.
DESIGN_DEFAULTS = [
    ("xmpp.component", "sip.xmpp.test"),
    ("xmpp.host", "127.0.0.1"),
    ("xmpp.port", 5347),
    ("xmpp.priority", 9),
    ("sip.tls_cert", ""),
    ("sip.tls_key", ""),
    ("sip.domain", "sip.test"),
    ("sip.jdomain", "jabber.sip.test"),
    ("sip.delimiter", "*"),
    ("sip.aliases", {"irc.xmpp.test": "%"}),
    ("sip.proxy", "sip:127.0.0.1:5060"),
    ("sip.registrar", "sip:jabber_gateway@sip.test"),
    ("database.url", "sqlite:///sipxmpp.db"),
    ("timers.cache_time", 600),
    ("timers.delay_time", 90),
    ("timers.sleep_time", 20),
    ("timers.check_time", 20),
    ("limits.workers", 2),
    ("limits.max_jobs", 10),
    ("limits.queue", 10000),
    ("limits.queue_per_recipient", 100),
    ("limits.sip_rate", 100.0),
    ("limits.sip_burst", 50),
    ("limits.xmpp_rate", 100.0),
    ("limits.xmpp_burst", 500),
    ("presence.sip_server", True),
    ("muc.nick_prefix", True),
    ("muc.auto_join", True),
    ("muc.history", 0),
    ("admin.jids", ("admin@xmpp.test",)),
    ("metrics.listen", ""),
]


def get(settings: Settings, key: str) -> object:
    section, name = key.split(".")
    return getattr(getattr(settings, section), name)


@pytest.mark.parametrize(("key", "expected"), DESIGN_DEFAULTS)
def test_defaults_follow_design(key: str, expected: object) -> None:
    assert get(load_settings(None), key) == expected


def test_design_list_defaults() -> None:
    settings = load_settings(None)
    assert [str(spec) for spec in settings.sip.listen] == [
        "udp:127.0.0.1:5070",
        "tcp:127.0.0.1:5070",
    ]
    assert [str(net) for net in settings.sip.trusted] == ["127.0.0.0/8", "::1/128"]
    assert settings.xmpp.secret.get_secret_value() == "secret"


def test_example_file_has_every_key_at_its_default() -> None:
    raw = tomllib.loads(EXAMPLE.read_text())
    defaults = load_settings(None)
    for section, field in Settings.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        assert set(raw[section]) == set(model.model_fields), section
    assert load_settings(EXAMPLE) == defaults


def test_secret_never_in_repr_or_str_or_dump() -> None:
    settings = load_settings(None).model_copy()
    assert "secret'" not in repr(settings) and "'secret" not in repr(settings)
    for text in (repr(settings), str(settings), settings.model_dump_json(), repr(settings.xmpp)):
        assert "hunter2" not in text
    custom = Settings.model_validate({"xmpp": {"secret": "hunter2"}})
    for text in (repr(custom), str(custom), custom.model_dump_json(), str(custom.xmpp.secret)):
        assert "hunter2" not in text
    assert custom.xmpp.secret.get_secret_value() == "hunter2"


def test_database_password_masked_in_repr() -> None:
    settings = Settings.model_validate(
        {"database": {"url": "postgresql://gw:s3cr3t@db.example/sipxmpp"}}
    )
    assert "s3cr3t" not in repr(settings)
    assert masked_url(settings.database.url) == "postgresql://gw:***@db.example/sipxmpp"
    assert settings.database.url.endswith("gw:s3cr3t@db.example/sipxmpp")


def test_settings_are_immutable() -> None:
    settings = load_settings(None)
    with pytest.raises(ValidationError):
        settings.xmpp.port = 1
    with pytest.raises(ValidationError):
        settings.sip = settings.sip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("udp:127.0.0.1:5070", ListenSpec("udp", "127.0.0.1", 5070)),
        ("TCP:0.0.0.0:5060", ListenSpec("tcp", "0.0.0.0", 5060)),
        ("tls:[::1]:5071", ListenSpec("tls", "::1", 5071)),
        ("udp:[2001:db8::1]:5060", ListenSpec("udp", "2001:db8::1", 5060)),
        ("udp:localhost:5060", ListenSpec("udp", "localhost", 5060)),
    ],
)
def test_listen_forms(text: str, expected: ListenSpec) -> None:
    spec = ListenSpec.parse(text)
    assert spec == expected
    assert ListenSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    "text",
    [
        "udp:127.0.0.1",
        "sctp:127.0.0.1:5060",
        "udp:::1:5060",
        "udp:127.0.0.1:0",
        "udp:1.2.3:x",
        "udp:[::1:5060",
        "127.0.0.1:5060",
        "udp:[nothost]:5060",
    ],
)
def test_listen_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        ListenSpec.parse(text)


def test_seed_jdomain_form_sets_delimiter(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, '[sip]\njdomain = "jabber.sipserver.com=~"\n'))
    assert (settings.sip.jdomain, settings.sip.delimiter) == ("jabber.sipserver.com", "~")
    same = load_settings(write(tmp_path, '[sip]\njdomain = "j.test=~"\ndelimiter = "~"\n'))
    assert same.sip.delimiter == "~"


def test_seed_jdomain_conflicting_delimiter(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, '[sip]\njdomain = "j.test=~"\ndelimiter = "!"\n')
    assert "conflicts" in errors["sip.delimiter"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"2;irc.xmpp.test=%;other.test=#;"', {"irc.xmpp.test": "%", "other.test": "#"}),
        ('"1;msn.x.com=%"', {"msn.x.com": "%"}),
        ('"0;"', {}),
        ('{ "IRC.xmpp.test" = "%" }', {"irc.xmpp.test": "%"}),
        ("{}", {}),
    ],
)
def test_aliases_forms(tmp_path: Path, value: str, expected: dict[str, str]) -> None:
    settings = load_settings(write(tmp_path, f"[sip]\naliases = {value}\n"))
    assert settings.sip.aliases == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ('"2;irc.xmpp.test=%;"', "says 2 aliases but lists 1"),
        ('"irc.xmpp.test=%"', "starts with the count"),
        ('"1;irc.xmpp.test"', "is not alias=delimiter"),
        ('"1;irc.xmpp.test=%%"', "delimiter must be one of"),
        ('{ "irc.xmpp.test" = "a" }', "delimiter must be one of"),
        ('{ "irc.xmpp.test" = "@" }', "delimiter must be one of"),
        ('{ "bad_domain" = "%" }', "not a valid domain"),
        ('{ "sip.test" = "%" }', "is also sip.domain"),
        ('{ "jabber.sip.test" = "%" }', "is also sip.jdomain"),
        ("5", "must be a table"),
    ],
)
def test_aliases_errors(tmp_path: Path, value: str, fragment: str) -> None:
    errors = errors_of(tmp_path, f"[sip]\naliases = {value}\n")
    assert fragment in errors["sip.aliases"]


# (toml text, full key named by the error, fragment of the message)
BAD_VALUES = [
    ("[xmpp]\nport = 70000", "xmpp.port", "must be 1-65535"),
    ("[xmpp]\nport = 0", "xmpp.port", "must be 1-65535"),
    ('[xmpp]\nport = "x"', "xmpp.port", "integer"),
    ('[xmpp]\ncomponent = "not a domain"', "xmpp.component", "not a valid domain"),
    ('[xmpp]\ncomponent = "-bad.test"', "xmpp.component", "not a valid domain"),
    ('[xmpp]\nhost = "bad host"', "xmpp.host", "not an IP address or host name"),
    ("[xmpp]\npriority = 200", "xmpp.priority", "127"),
    ('[sip]\nlisten = ["udp:1.2.3.4:5060", "udp:[::1]:99999"]', "sip.listen[1]", "1-65535"),
    ('[sip]\nlisten = ["tls:[::1]:5071"]', "sip.tls_cert", "required by the tls"),
    ('[sip]\nlisten = ["tls:[::1]:5071"]', "sip.tls_key", "required by the tls"),
    ("[sip]\nlisten = 5", "sip.listen", "tuple"),
    ("[sip]\nlisten = [5]", "sip.listen[0]", "must be a string"),
    ('[sip]\ndomain = "a..b"', "sip.domain", "not a valid domain"),
    ('[sip]\njdomain = "sip.test"', "sip.jdomain", "is also sip.domain"),
    ('[sip]\njdomain = "x y"', "sip.jdomain", "not a valid domain"),
    ('[sip]\ndelimiter = "ab"', "sip.delimiter", "must be one of"),
    ('[sip]\ndelimiter = "."', "sip.delimiter", "must be one of"),
    ('[sip]\ndelimiter = "a"', "sip.delimiter", "must be one of"),
    ('[sip]\ndelimiter = "%"', "sip.delimiter", "must be one of"),
    ('[sip]\nproxy = "127.0.0.1:5060"', "sip.proxy", "not a sip: URI"),
    ('[sip]\nproxy = "sip:127.0.0.1:99999"', "sip.proxy", "1-65535"),
    ('[sip]\nregistrar = "mailto:x@y"', "sip.registrar", "not a sip: URI"),
    ('[sip]\nregistrar = "sip:sip.test"', "sip.registrar", "user part"),
    ('[sip]\nregistrar = "sip:a%zz@sip.test"', "sip.registrar", "bad %-escape"),
    ('[sip]\ntrusted = ["10.0.0.0/33"]', "sip.trusted[0]", "not an IP network"),
    ('[sip]\ntrusted = ["::1/128", "nonsense"]', "sip.trusted[1]", "not an IP network"),
    ("[sip]\nt1 = 0", "sip.t1", "positive"),
    ('[sip]\nbogus = "x"', "sip.bogus", "unknown key"),
    ('[database]\nurl = "oracle://x/y"', "database.url", "backend 'oracle'"),
    ('[database]\nurl = "not a url"', "database.url", "not a database URL"),
    ("[timers]\ndelay_time = 0", "timers.delay_time", "positive"),
    ("[timers]\ncache_time = -5", "timers.cache_time", "positive"),
    ("[limits]\nworkers = 0", "limits.workers", "at least 1"),
    ("[limits]\nmax_jobs = 0", "limits.max_jobs", "at least 1"),
    ("[limits]\nqueue = 0", "limits.queue", "at least 1"),
    ('[limits]\nqueue_per_recipient = "many"', "limits.queue_per_recipient", "integer"),
    ("[limits]\nsip_rate = 0", "limits.sip_rate", "requests per second"),
    ('[limits]\nsip_rate = "fast"', "limits.sip_rate", "number"),
    ("[limits]\nsip_burst = 0", "limits.sip_burst", "at least 1"),
    ("[limits]\nxmpp_rate = -1", "limits.xmpp_rate", "requests per second"),
    ("[limits]\nxmpp_burst = 0", "limits.xmpp_burst", "at least 1"),
    ("[muc]\nhistory = -1", "muc.history", "0"),
    ('[muc]\nauto_join = "perhaps"', "muc.auto_join", "boolean"),
    ('[admin]\njids = ["not a jid"]', "admin.jids[0]", "not a valid JID"),
    ('[admin]\njids = ["a@b.test/res"]', "admin.jids[0]", "bare JID"),
    ('[metrics]\nlisten = "9180"', "metrics.listen", "HOST:PORT"),
    ("[nonsense]\nx = 1", "nonsense", "unknown key"),
]


@pytest.mark.parametrize(("text", "key", "fragment"), BAD_VALUES)
def test_bad_values_name_their_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    errors = errors_of(tmp_path, text + "\n")
    assert key in errors, errors
    assert fragment in errors[key]


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "[xmpp]\nport = 0\n[limits]\nworkers = 0\nmax_jobs = 0\n")
    assert set(errors) == {"xmpp.port", "limits.workers", "limits.max_jobs"}


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///sipxmpp.db",
        "sqlite://",
        "postgresql://gw:pw@127.0.0.1:5432/sipxmpp",
        "postgresql+psycopg2://gw@localhost/sipxmpp",
        "mysql://root@127.0.0.1/sip_jab",
    ],
)
def test_database_urls_accepted(url: str) -> None:
    assert Settings.model_validate({"database": {"url": url}}).database.url == url


def test_tls_listener_with_files(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("y")
    text = f'[sip]\nlisten = ["tls:[::1]:5071"]\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
    assert load_settings(write(tmp_path, text)).sip.listen[0].transport == "tls"
    missing = text.replace(str(key), str(tmp_path / "absent.pem"))
    assert "no such file" in errors_of(tmp_path, missing)["sip.tls_key"]


def test_registrar_defaults_to_home_domain(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, '[sip]\ndomain = "example.org"\n'))
    assert settings.sip.registrar == "sip:jabber_gateway@example.org"


def test_proxy_may_be_empty(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, '[sip]\nproxy = ""\n')).sip.proxy == ""


def test_metrics_address(tmp_path: Path) -> None:
    assert load_settings(None).metrics.address is None
    metrics = Settings.model_validate({"metrics": {"listen": "[::1]:9180"}}).metrics
    assert metrics.address == ("::1", 9180)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(tmp_path / "absent.toml")
    assert caught.value.errors[0][0] == "config"
    assert "no such file" in caught.value.errors[0][1]
    broken = write(tmp_path, "[xmpp\nport = 1\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(broken)
    assert "not valid TOML" in caught.value.errors[0][1]


# --- environment --------------------------------------------------------------------------------

ENV_CASES = [
    ("SIPXMPP_XMPP__PORT", "6000", "xmpp.port", 6000),
    ("SIPXMPP_SIP__PROXY", "sip:10.0.0.1:5060", "sip.proxy", "sip:10.0.0.1:5060"),
    ("SIPXMPP_SIP__PROXY", "", "sip.proxy", ""),
    ("sipxmpp_limits__workers", "7", "limits.workers", 7),
    ("SIPXMPP_LIMITS__SIP_RATE", "2.5", "limits.sip_rate", 2.5),
    ("SIPXMPP_PRESENCE__SIP_SERVER", "false", "presence.sip_server", False),
    ("SIPXMPP_TIMERS__DELAY_TIME", "1.5", "timers.delay_time", 1.5),
    ("SIPXMPP_SIP__ALIASES", "2;a.test=%;b.test=#;", "sip.aliases", {"a.test": "%", "b.test": "#"}),
    ("SIPXMPP_SIP__ALIASES", '{"a.test": "%"}', "sip.aliases", {"a.test": "%"}),
    ("SIPXMPP_ADMIN__JIDS", "a@x.test, b@x.test", "admin.jids", ("a@x.test", "b@x.test")),
    ("SIPXMPP_ADMIN__JIDS", '["a@x.test"]', "admin.jids", ("a@x.test",)),
    ("SIPXMPP_SIP__JDOMAIN", "jab.sip.test", "sip.jdomain", "jab.sip.test"),
]


@pytest.mark.parametrize(("name", "value", "key", "expected"), ENV_CASES)
def test_environment_overrides_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    value: str,
    key: str,
    expected: object,
) -> None:
    path = write(
        tmp_path, '[xmpp]\nport = 5999\n[sip]\nproxy = "sip:1.1.1.1"\n[limits]\nworkers = 3\n'
    )
    monkeypatch.setenv(name, value)
    settings = load_settings(path)
    assert get(settings, key) == expected
    # Keys not overridden keep the file's values.
    if key != "xmpp.port":
        assert settings.xmpp.port == 5999


def test_environment_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIPXMPP_SIP__LISTEN", "udp:0.0.0.0:5060, tls:[::]:5061")
    monkeypatch.setenv("SIPXMPP_SIP__TRUSTED", '["10.0.0.0/8"]')
    monkeypatch.setenv("SIPXMPP_SIP__TLS_CERT", __file__)
    monkeypatch.setenv("SIPXMPP_SIP__TLS_KEY", __file__)
    settings = load_settings(None)
    assert settings.sip.listen == (
        ListenSpec("udp", "0.0.0.0", 5060),
        ListenSpec("tls", "::", 5061),
    )
    assert settings.sip.trusted == (ipaddress.ip_network("10.0.0.0/8"),)


def test_environment_errors_name_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIPXMPP_XMPP__PORT", "99999")
    monkeypatch.setenv("SIPXMPP_SIP__LISTEN", "[not json")
    with pytest.raises(SettingsError) as caught:
        load_settings(None)
    errors = dict(caught.value.errors)
    assert "1-65535" in errors["xmpp.port"]
    assert "JSON" in errors["sip.listen"]


def test_environment_jdomain_seed_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIPXMPP_SIP__JDOMAIN", "jabber.sip.test=!")
    settings = load_settings(None)
    assert (settings.sip.jdomain, settings.sip.delimiter) == ("jabber.sip.test", "!")


def test_unrelated_environment_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIPXMPP_CONFIG", "/nonexistent.toml")
    monkeypatch.setenv("SIPXMPP_UNKNOWN", "1")
    assert load_settings(None) == Settings()
