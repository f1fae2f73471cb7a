"""Settings of the gateway process: one TOML file plus environment overrides (DESIGN 9, 10).

The key names are an interface operators rely on; they follow DESIGN 9 exactly. Every value can
be overridden by an environment variable ``SIPXMPP_<SECTION>__<KEY>`` (the environment wins over
the file). Lists and tables in the environment are JSON, or the short forms the seed used:
``SIPXMPP_SIP__LISTEN=udp:0.0.0.0:5060,tcp:0.0.0.0:5060``, ``SIPXMPP_SIP__ALIASES=1;irc.x=%;``.

Validation errors are collected into one :class:`SettingsError` whose entries name the full key
(``sip.listen[1]``, ``xmpp.port``), so ``sipxmpp check-config`` can print all of them at once.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from component.addresses import (
    ALIAS_DELIMITERS,
    SIP_DELIMITERS,
    AddressError,
    is_dns_name,
    sip_user_and_host,
)

ENV_PREFIX = "SIPXMPP_"
Transport = Literal["udp", "tcp", "tls"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SettingsError(Exception):
    """The configuration is unusable; ``errors`` lists ``(key, message)`` pairs for the operator."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{key}: {message}" for key, message in errors))
        self.errors = errors


# --- value checks, shared by the Annotated types below ------------------------------------------


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("must be 1-65535")
    return value


def _check_domain(value: str) -> str:
    domain = value.strip().lower().rstrip(".")
    if not is_dns_name(domain):
        raise ValueError(f"{value!r} is not a valid domain name (ASCII labels, use xn-- for IDN)")
    return domain


def _check_domain_or_ip(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value.strip()))
    except ValueError:
        return _check_domain(value)


def _check_host(value: str) -> str:
    """A host to connect to or bind: IP literal (IPv6 bare or in brackets) or a DNS name."""
    bare = value.strip()
    if bare.startswith("[") and bare.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(bare[1:-1]))
        except ValueError:
            raise ValueError(f"{value!r}: only IPv6 addresses go in brackets") from None
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    try:
        return _check_domain(bare)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or host name") from None


def _check_positive(value: float) -> float:
    if not value > 0:
        raise ValueError("must be a positive number of seconds")
    return value


def _check_at_least_one(value: int) -> int:
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _check_sip_uri(value: str) -> str:
    # Only the shape that matters for routing: scheme and a host part. The SIP layer parses it
    # fully; here we catch typos such as a missing scheme before the process starts.
    match = re.fullmatch(
        r"(sips?):(?:([^@;?]+)@)?(\[[0-9A-Fa-f:.]+\]|[^:;?@\[\]]+)(?::(\d+))?(;.*)?", value.strip()
    )
    if match is None:
        raise ValueError(f"{value!r} is not a sip: URI (for example sip:127.0.0.1:5060)")
    _check_host(match.group(3))
    if match.group(4) is not None:
        _check_port(int(match.group(4)))
    return value.strip()


def _split_list(value: Any) -> Any:
    """Environment form of a list: JSON, or comma-separated words."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a valid JSON list: {exc}") from None
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


Port = Annotated[int, AfterValidator(_check_port)]
Domain = Annotated[str, AfterValidator(_check_domain)]
Host = Annotated[str, AfterValidator(_check_host)]
Seconds = Annotated[float, AfterValidator(_check_positive)]
Count = Annotated[int, AfterValidator(_check_at_least_one)]


# --- listen addresses ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenSpec:
    """One SIP listening socket: ``udp:127.0.0.1:5070`` or ``tls:[::1]:5071``."""

    transport: Transport
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ListenSpec:
        """Parse ``transport:host:port``; IPv6 hosts go in brackets."""
        match = re.fullmatch(r"(\w+):(\[[^\]]*\]|[^:\[\]]+):(\d+)", text.strip())
        if match is None:
            raise ValueError(f"{text!r} is not TRANSPORT:HOST:PORT (IPv6 as udp:[::1]:5070)")
        transport = match.group(1).lower()
        if transport not in ("udp", "tcp", "tls"):
            raise ValueError(f"transport {match.group(1)!r} is not udp, tcp or tls")
        host = _check_host(match.group(2))
        if ":" in host and not match.group(2).startswith("["):
            raise ValueError("IPv6 addresses go in brackets: udp:[::1]:5070")
        port = _check_port(int(match.group(3)))
        return cls(transport, host, port)  # type: ignore[arg-type]  # checked just above

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}:{host}:{self.port}"


def _listen_spec(value: Any) -> ListenSpec:
    if isinstance(value, ListenSpec):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a string such as udp:127.0.0.1:5070")
    return ListenSpec.parse(value)


Listen = Annotated[ListenSpec, PlainValidator(_listen_spec), PlainSerializer(str)]


def _network(value: Any) -> IPNetwork:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a string such as 127.0.0.0/8")
    try:
        # strict=False: "10.0.0.1/8" means the network 10.0.0.0/8, as in most firewall tools.
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP network (CIDR, e.g. 127.0.0.0/8)") from None


Network = Annotated[IPNetwork, PlainValidator(_network), PlainSerializer(str)]


# --- sections -----------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GatewaySettings(_Section):
    """``[gateway]``: this instance among several sharing one database (DESIGN 9)."""

    instance: str = Field(default="", max_length=255)

    @field_validator("instance")
    @classmethod
    def _check_instance(cls, value: str) -> str:
        value = value.strip()
        if any(ch.isspace() or not ch.isprintable() for ch in value):
            raise ValueError(f"{value!r}: an instance name has no spaces or control characters")
        return value

    @property
    def name(self) -> str:
        """The instance name: ``instance``, or the host name and process id when empty."""
        return self.instance or f"{socket.gethostname()}-{os.getpid()}"


class XmppSettings(_Section):
    """``[xmpp]``: the component connection (XEP-0114)."""

    component: Domain = "sip.xmpp.test"
    host: Host = "127.0.0.1"
    port: Port = 5347
    secret: SecretStr = SecretStr("secret")
    priority: int = Field(default=9, ge=-128, le=127)  # RFC 6121 4.7.2.3


@dataclass(frozen=True, slots=True)
class _Conflict:
    """Marks a delimiter given twice with different values, reported at ``sip.delimiter``."""

    in_jdomain: str
    explicit: str


class SipSettings(_Section):
    """``[sip]``: listeners, domains and address forms of the SIP side."""

    listen: Annotated[tuple[Listen, ...], NoDecode, BeforeValidator(_split_list)] = (
        ListenSpec("udp", "127.0.0.1", 5070),
        ListenSpec("tcp", "127.0.0.1", 5070),
    )
    tls_cert: str = Field(default="", validate_default=True)
    tls_key: str = Field(default="", validate_default=True)
    domain: Annotated[str, AfterValidator(_check_domain_or_ip)] = "sip.test"
    jdomain: Domain = "jabber.sip.test"
    delimiter: str = "*"
    aliases: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=lambda: {"irc.xmpp.test": "%"}
    )
    proxy: str = "sip:127.0.0.1:5060"
    registrar: str = ""  # empty: sip:jabber_gateway@<domain> (DESIGN 4.4)
    trusted: Annotated[tuple[Network, ...], NoDecode, BeforeValidator(_split_list)] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    # RFC 3261 17.1.2.1 timer values (DESIGN 7: configurable), seconds.
    t1: Seconds = 0.5
    t2: Seconds = 4.0
    t4: Seconds = 5.0

    @model_validator(mode="before")
    @classmethod
    def _seed_forms(cls, data: Any) -> Any:
        # Seed: jdomain "jabber.sipserver.com=*" carries the delimiter; derived registrar.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        jdomain = data.get("jdomain")
        if isinstance(jdomain, str) and "=" in jdomain:
            domain, _, delimiter = jdomain.partition("=")
            data["jdomain"] = domain
            explicit = data.get("delimiter")
            if isinstance(explicit, str) and explicit != delimiter:
                data["delimiter"] = _Conflict(delimiter, explicit)
            else:
                data["delimiter"] = delimiter
        domain = data.get("domain", "sip.test")
        if not data.get("registrar") and isinstance(domain, str):
            data["registrar"] = f"sip:jabber_gateway@{domain.strip().lower().rstrip('.')}"
        return data

    @field_validator("delimiter", mode="before")
    @classmethod
    def _check_delimiter(cls, value: Any) -> Any:
        if isinstance(value, _Conflict):
            raise ValueError(
                f"{value.explicit!r} conflicts with the {value.in_jdomain!r} of sip.jdomain"
            )
        if not isinstance(value, str) or len(value) != 1 or value not in SIP_DELIMITERS:
            raise ValueError(f"must be one of the characters {SIP_DELIMITERS} (got {value!r})")
        return value

    @field_validator("aliases", mode="before")
    @classmethod
    def _check_aliases(cls, value: Any) -> dict[str, str]:
        if isinstance(value, str):
            value = _parse_aliases(value)
        if not isinstance(value, dict):
            raise ValueError('must be a table such as { "irc.xmpp.test" = "%" }')
        aliases: dict[str, str] = {}
        for domain, delimiter in value.items():
            if not isinstance(domain, str) or not isinstance(delimiter, str):
                raise ValueError(f"{domain!r}: domain and delimiter must be strings")
            try:
                name = _check_domain(domain)
            except ValueError as exc:
                raise ValueError(f"alias {exc}") from None
            if len(delimiter) != 1 or delimiter not in ALIAS_DELIMITERS:
                raise ValueError(
                    f"{domain!r}: delimiter must be one of {ALIAS_DELIMITERS} (got {delimiter!r})"
                )
            aliases[name] = delimiter
        return aliases

    @field_validator("proxy")
    @classmethod
    def _check_proxy(cls, value: str) -> str:
        return "" if not value.strip() else _check_sip_uri(value)

    @field_validator("registrar")
    @classmethod
    def _check_registrar(cls, value: str) -> str:
        uri = _check_sip_uri(value)
        try:
            user, _host = sip_user_and_host(uri)
        except AddressError as exc:
            raise ValueError(exc.text) from None
        if not user:
            raise ValueError(f"{value!r} needs a user part, e.g. sip:jabber_gateway@sip.test")
        return uri

    @field_validator("tls_cert", "tls_key")
    @classmethod
    def _check_tls_files(cls, value: str, info: ValidationInfo) -> str:
        # Runs for the defaults too (validate_default), so a tls: listener without files fails.
        listeners = info.data.get("listen", ())
        if any(spec.transport == "tls" for spec in listeners):
            if not value:
                raise ValueError("required by the tls: listeners in sip.listen")
            if not Path(value).is_file():
                raise ValueError(f"{value}: no such file")
        return value

    @field_validator("jdomain")
    @classmethod
    def _check_jdomain_distinct(cls, value: str, info: ValidationInfo) -> str:
        if value == info.data.get("domain"):
            raise ValueError(f"{value!r} is also sip.domain; the two must differ")
        return value

    @field_validator("aliases")
    @classmethod
    def _check_aliases_distinct(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        for key in ("domain", "jdomain"):
            if info.data.get(key) in value:
                raise ValueError(f"{info.data[key]!r} is also sip.{key}; the two must differ")
        return value


def _parse_aliases(text: str) -> dict[str, str]:
    """Seed form ``N;alias1=delim1;alias2=delim2;`` (a trailing ``;`` is optional)."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            parsed = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a valid JSON table: {exc}") from None
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object")
        return parsed
    fields = [field.strip() for field in stripped.split(";")]
    if fields and fields[-1] == "":
        fields.pop()
    if not fields or not fields[0].isdigit():
        raise ValueError(f"{text!r}: the string form starts with the count: 2;a.test=%;b.test=#;")
    count, pairs = int(fields[0]), fields[1:]
    if count != len(pairs):
        raise ValueError(f"{text!r}: says {count} aliases but lists {len(pairs)}")
    aliases: dict[str, str] = {}
    for pair in pairs:
        domain, sep, delimiter = pair.partition("=")
        if not sep:
            raise ValueError(f"{pair!r} is not alias=delimiter")
        aliases[domain.strip()] = delimiter.strip()
    return aliases


_DB_BACKENDS = ("sqlite", "postgresql", "mysql", "mariadb")


class DatabaseSettings(_Section):
    """``[database]``: the store (SQLite default; PostgreSQL; the seed's MySQL URLs)."""

    url: str = "sqlite:///sipxmpp.db"

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value.strip())
        except ArgumentError:
            raise ValueError(f"{masked_url(value)!r} is not a database URL") from None
        if url.get_backend_name() not in _DB_BACKENDS:
            raise ValueError(
                f"backend {url.get_backend_name()!r} is not one of {', '.join(_DB_BACKENDS)}"
            )
        return value.strip()

    def __repr_args__(self) -> Any:
        # The URL may carry a password; repr and logs show it masked.
        yield "url", masked_url(self.url)


def masked_url(url: str) -> str:
    """The database URL with any password replaced by ``***``."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


class TimerSettings(_Section):
    """``[timers]``: the seed's timers, in seconds (DESIGN 10)."""

    cache_time: Seconds = 600.0
    delay_time: Seconds = 90.0
    sleep_time: Seconds = 20.0
    check_time: Seconds = 20.0


def _check_rate(value: float) -> float:
    if not value > 0:
        raise ValueError("must be a positive number of requests per second")
    return value


class LimitSettings(_Section):
    """``[limits]``: SIP transactions in flight (workers x max_jobs), then bounded queues.

    ``sip_rate`` and ``sip_burst``: the token bucket of each SIP source (address, or sender
    behind the proxy): requests per second, and how many may come at once. ``xmpp_rate`` and
    ``xmpp_burst``: the same for the stanzas of each XMPP sender (bare JID).
    """

    workers: Count = 2
    max_jobs: Count = 10
    # Messages waiting in memory for a free transaction or their conversation's turn (DESIGN 8).
    queue: Count = 10000
    # Of those, how many one XMPP sender's may take (its later ones are refused meanwhile).
    queue_per_sender: Count = 1000
    # Messages stored for one recipient who is out of reach; beyond it the sender is refused.
    queue_per_recipient: Count = 100
    sip_rate: Annotated[float, AfterValidator(_check_rate)] = 100.0
    sip_burst: Count = 50
    xmpp_rate: Annotated[float, AfterValidator(_check_rate)] = 100.0
    xmpp_burst: Count = 500


class PresenceSettings(_Section):
    """``[presence]``: whether the SIP side has a presence server (DESIGN 5.3)."""

    sip_server: bool = True


class MucSettings(_Section):
    """``[muc]``: chat room behaviour towards SIP users (DESIGN 6)."""

    nick_prefix: bool = True
    auto_join: bool = True
    history: int = Field(default=0, ge=0)


def _check_bare_jid(value: str) -> str:
    from slixmpp.jid import JID, InvalidJID

    try:
        jid = JID(value.strip())
    except InvalidJID:
        raise ValueError(f"{value!r} is not a valid JID") from None
    if jid.resource or not jid.user:
        raise ValueError(f"{value!r} must be a bare JID: user@domain")
    return str(jid.bare)


class AdminSettings(_Section):
    """``[admin]``: JIDs allowed to run the ad-hoc commands."""

    jids: Annotated[
        tuple[Annotated[str, AfterValidator(_check_bare_jid)], ...],
        NoDecode,
        BeforeValidator(_split_list),
    ] = ("admin@xmpp.test",)


class MetricsSettings(_Section):
    """``[metrics]``: the Prometheus/health endpoint; empty ``listen`` turns it off."""

    listen: str = ""

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        if value.strip():
            match = re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]+):(\d+)", value.strip())
            if match is None:
                raise ValueError(f"{value!r} is not HOST:PORT (IPv6 as [::1]:9180), or empty")
            _check_host(match.group(1))
            _check_port(int(match.group(2)))
        return value.strip()

    @property
    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` to bind, or None when metrics are off."""
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class Settings(BaseSettings):
    """The whole configuration; immutable. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    xmpp: XmppSettings = Field(default_factory=XmppSettings)
    sip: SipSettings = Field(default_factory=SipSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    timers: TimerSettings = Field(default_factory=TimerSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    presence: PresenceSettings = Field(default_factory=PresenceSettings)
    muc: MucSettings = Field(default_factory=MucSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init values; the first source wins, so env beats the file.
        return env_settings, init_settings


def load_settings(path: Path | None) -> Settings:
    """Read the TOML file at ``path`` (None: defaults), apply the environment, validate.

    Raises :class:`SettingsError` listing every bad key; never another exception.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as file:
                data = tomllib.load(file)
        except FileNotFoundError:
            raise SettingsError([("config", f"{path}: no such file")]) from None
        except OSError as exc:
            raise SettingsError([("config", f"{path}: {exc.strerror or exc}")]) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SettingsError([("config", f"{path}: not valid TOML: {exc}")]) from None
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise SettingsError([_describe(error) for error in exc.errors()]) from None
    except PydanticSettingsError as exc:
        raise SettingsError([("environment", str(exc))]) from None


def _describe(error: Any) -> tuple[str, str]:
    """Turn one pydantic error into ``(full key, message)``."""
    key = ""
    for part in error["loc"]:
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key += f".{part}" if key else str(part)
    message = str(error["msg"])
    match error["type"]:
        case "value_error":
            message = message.removeprefix("Value error, ")
        case "extra_forbidden":
            message = "unknown key"
        case _:
            message = message[:1].lower() + message[1:]
    return key or "config", message
