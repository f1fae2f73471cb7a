"""SIP dialogs (RFC 3261 section 12) as frozen values.

A ``Dialog`` holds the state RFC 3261 12 names: Call-ID, tags, local and remote URI, sequence
numbers, remote target, route set and the secure flag. Creating one from a request/response
pair and building the next in-dialog request are pure functions that return a new ``Dialog``.
A dialog whose ``remote_tag`` is empty is not yet confirmed; it builds out-of-dialog requests
(initial SUBSCRIBE, PUBLISH) that share one Call-ID and an increasing CSeq.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from typing import Any

from sipside.errors import PeerError
from sipside.fastpath import fast_frozen_init
from sipside.headers import parse_name_addr
from sipside.message import SipRequest, SipResponse, new_call_id, new_tag

__all__ = ["Dialog", "DialogFields", "DialogId", "address_uri", "strip_tag"]

MAX_FORWARDS = "70"


def _find_unquoted(text: str, char: str, start: int = 0) -> int:
    """Index of ``char`` outside double quotes, or -1."""
    quoted = False
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\" and quoted:
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == char and not quoted:
            return i
        i += 1
    return -1


def address_uri(value: str) -> str:
    """The URI inside a name-addr or addr-spec header value (Contact, From, Route...)."""
    return parse_name_addr(value).uri


def strip_tag(value: str) -> str:
    """A From/To value without its ``tag`` parameter (the dialog keeps the tag apart)."""
    lt = _find_unquoted(value, "<")
    split = value.find(">", lt) + 1 if lt >= 0 else value.find(";")
    if split <= 0:
        return value.strip()
    head, params = value[:split], value[split:]
    kept = [p for p in params.split(";")[1:] if p.strip().split("=")[0].lower() != "tag"]
    return head.strip() + "".join(";" + p for p in kept)


def _required(value: str | None, warning: str) -> str:
    """A header or tag a dialog cannot be created without; its absence is a 400."""
    if value is None:
        raise PeerError(400, "Bad Request", warning)
    return value


@dataclass(frozen=True, slots=True, init=False, eq=False)
class DialogId:
    """The hashable key of a dialog (RFC 3261 12: Call-ID, local tag, remote tag)."""

    call_id: str
    local_tag: str
    remote_tag: str

    # Written out (not generated) so that compiled they are native: a NOTIFY builds two keys
    # and hashes and compares them ten times in dict lookups (counted in bench.presence_fanout).
    def __init__(self, call_id: str, local_tag: str, remote_tag: str) -> None:
        self.call_id = call_id  # type: ignore[misc]
        self.local_tag = local_tag  # type: ignore[misc]
        self.remote_tag = remote_tag  # type: ignore[misc]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DialogId):
            return NotImplemented
        return (
            self.call_id == other.call_id
            and self.local_tag == other.local_tag
            and self.remote_tag == other.remote_tag
        )

    def __hash__(self) -> int:
        return hash((self.call_id, self.local_tag, self.remote_tag))


fast_frozen_init(DialogId)


@dataclass(frozen=True, slots=True)
class DialogFields:
    """The state RFC 3261 12 names for a dialog; ``remote_cseq`` is None while the remote
    sequence is empty. Machine snapshots extend it, so the store keeps them flat."""

    call_id: str
    local_tag: str
    remote_tag: str
    local_uri: str
    remote_uri: str
    local_cseq: int
    remote_cseq: int | None
    remote_target: str
    route_set: tuple[str, ...] = ()
    secure: bool = False


@dataclass(frozen=True, slots=True, init=False)
class Dialog(DialogFields):
    """A dialog of RFC 3261 12: its fields plus the rules that create and advance it."""

    # Written out (not generated) so that compiled it is native: see fast_frozen_init. Every
    # request sent makes a new dialog (its CSeq); ``dataclasses.replace`` cost a tenth of a
    # NOTIFY (callgrind, bench.presence_fanout).
    def __init__(
        self,
        call_id: str,
        local_tag: str,
        remote_tag: str,
        local_uri: str,
        remote_uri: str,
        local_cseq: int,
        remote_cseq: int | None,
        remote_target: str,
        route_set: tuple[str, ...] = (),
        secure: bool = False,
    ) -> None:
        self.call_id = call_id  # type: ignore[misc]
        self.local_tag = local_tag  # type: ignore[misc]
        self.remote_tag = remote_tag  # type: ignore[misc]
        self.local_uri = local_uri  # type: ignore[misc]
        self.remote_uri = remote_uri  # type: ignore[misc]
        self.local_cseq = local_cseq  # type: ignore[misc]
        self.remote_cseq = remote_cseq  # type: ignore[misc]
        self.remote_target = remote_target  # type: ignore[misc]
        self.route_set = route_set  # type: ignore[misc]
        self.secure = secure  # type: ignore[misc]

    def with_local_cseq(self, number: int) -> Dialog:
        """This dialog with ``number`` as the last local CSeq used."""
        return Dialog(
            self.call_id,
            self.local_tag,
            self.remote_tag,
            self.local_uri,
            self.remote_uri,
            number,
            self.remote_cseq,
            self.remote_target,
            self.route_set,
            self.secure,
        )

    @property
    def id(self) -> DialogId:
        """The key of this dialog."""
        return DialogId(self.call_id, self.local_tag, self.remote_tag)

    @property
    def confirmed(self) -> bool:
        """A dialog is usable in-dialog once the remote tag is known."""
        return bool(self.remote_tag)

    @classmethod
    def unconfirmed(
        cls,
        *,
        local_uri: str,
        remote_uri: str,
        request_uri: str | None = None,
        call_id: str | None = None,
        local_tag: str | None = None,
        route_set: Iterable[str] = (),
        local_cseq: int = 0,
    ) -> Dialog:
        """State for requests sent outside a dialog (RFC 3261 8.1.1) before any answer.

        The Request-URI defaults to the URI of ``remote_uri``; Call-ID and tag are new ones.
        """
        request_uri = request_uri or address_uri(remote_uri)
        return cls(
            call_id=call_id or new_call_id(),
            local_tag=local_tag or new_tag(),
            remote_tag="",
            local_uri=local_uri,
            remote_uri=remote_uri,
            local_cseq=local_cseq,
            remote_cseq=None,
            remote_target=request_uri,
            route_set=tuple(route_set),
            secure=request_uri.lower().startswith("sips:"),
        )

    @classmethod
    def from_uac(cls, request: SipRequest, response: SipResponse) -> Dialog:
        """The dialog a UAC creates from its request and a 2xx/1xx with To tag (RFC 3261 12.1.2)."""
        contact = _required(response.header("Contact"), "dialog-creating response without Contact")
        local_tag = _required(request.from_tag, "request without From tag")
        return cls(
            call_id=request.call_id,
            local_tag=local_tag,
            # RFC 3261 12.1.2: a missing To tag is an empty remote tag (RFC 2543 peers).
            remote_tag=response.to_tag or "",
            local_uri=strip_tag(request.header("From") or ""),
            remote_uri=strip_tag(request.header("To") or ""),
            local_cseq=request.cseq[0],
            remote_cseq=None,
            remote_target=address_uri(contact),
            # RFC 3261 12.1.2: the route set is the Record-Route list in reverse order.
            route_set=tuple(reversed(response.header_values("Record-Route"))),
            secure=request.uri.lower().startswith("sips:"),
        )

    @classmethod
    def from_uas(cls, request: SipRequest, local_tag: str) -> Dialog:
        """The dialog a UAS creates when it answers ``request`` with To tag ``local_tag``.

        RFC 3261 12.1.1; also used by a subscriber whose first NOTIFY arrives before the 2xx
        (RFC 6665 4.1.2.4), with ``local_tag`` the From tag of its SUBSCRIBE.
        """
        contact = _required(request.header("Contact"), f"{request.method} without Contact")
        remote_tag = _required(request.from_tag, "request without From tag")
        return cls(
            call_id=request.call_id,
            local_tag=local_tag,
            remote_tag=remote_tag,
            local_uri=strip_tag(request.header("To") or ""),
            remote_uri=strip_tag(request.header("From") or ""),
            local_cseq=0,
            remote_cseq=request.cseq[0],
            remote_target=address_uri(contact),
            # RFC 3261 12.1.1: the route set is the Record-Route list in order.
            route_set=tuple(request.header_values("Record-Route")),
            secure=request.uri.lower().startswith("sips:"),
        )

    def confirm(self, response: SipResponse) -> Dialog:
        """Confirm an unconfirmed dialog with the 2xx to its request (RFC 3261 12.1.2).

        A 2xx without Contact keeps the Request-URI as remote target rather than failing:
        some presence servers omit it on 200 to SUBSCRIBE and send it in the NOTIFY.
        """
        contact = response.header("Contact")
        return replace(
            self,
            remote_tag=response.to_tag or "",
            remote_target=address_uri(contact) if contact else self.remote_target,
            route_set=tuple(reversed(response.header_values("Record-Route"))),
        )

    def matches(self, request: SipRequest) -> bool:
        """Does an incoming request belong to this dialog (RFC 3261 12.2.2)?"""
        return (
            request.call_id == self.call_id
            and request.to_tag == self.local_tag
            and (request.from_tag or "") == self.remote_tag
        )

    def receive(self, request: SipRequest, *, target_refresh: bool = False) -> Dialog:
        """Account for an in-dialog request from the peer; raises 500 when CSeq went back."""
        number = request.cseq[0]
        # RFC 3261 12.2.2: a CSeq lower than the remote sequence number gets 500.
        if self.remote_cseq is not None and number < self.remote_cseq:
            raise PeerError(500, "Server Internal Error", "CSeq lower than the dialog's")
        target = self.remote_target
        contact = request.header("Contact")
        if target_refresh and contact is not None:
            # RFC 3261 12.2.2 / RFC 6665 4.1.2.1: target refresh requests update the target.
            target = address_uri(contact)
        return replace(self, remote_cseq=number, remote_target=target)

    def refresh_target(self, message: SipRequest | SipResponse) -> Dialog:
        """Adopt the Contact of a target-refresh message (e.g. the 2xx of a re-SUBSCRIBE)."""
        contact = message.header("Contact")
        if contact is None:
            return self
        return replace(self, remote_target=address_uri(contact))

    def request(
        self,
        method: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        cseq: int | None = None,
    ) -> tuple[Dialog, SipRequest]:
        """The next request in this dialog, without Via (the transport adds it).

        RFC 3261 12.2.1.1 with loose routing only: the Request-URI is the remote target and
        the route set becomes Route headers in order. CSeq is one more than the last one sent.
        """
        number = self.local_cseq + 1 if cseq is None else cseq
        to = self.remote_uri + (f";tag={self.remote_tag}" if self.remote_tag else "")
        lines: list[tuple[str, str]] = [("Route", route) for route in self.route_set]
        lines += [
            ("Max-Forwards", MAX_FORWARDS),
            ("From", f"{self.local_uri};tag={self.local_tag}"),
            ("To", to),
            ("Call-ID", self.call_id),
            ("CSeq", f"{number} {method}"),
        ]
        lines += headers
        request = SipRequest(method, self.remote_target, tuple(lines), body)
        return self.with_local_cseq(number), request


fast_frozen_init(Dialog)

# Named once: ``fields()`` rebuilds its tuple on every call, and a snapshot is taken per NOTIFY.
_DIALOG_FIELDS = tuple(f.name for f in fields(DialogFields))


def dialog_fields(state: DialogFields) -> dict[str, Any]:
    """The dialog fields of ``state`` as keyword arguments, to build a snapshot from a dialog
    or a dialog from a snapshot: ``Snapshot(**dialog_fields(d), ...)``, ``dialog_from(snap)``."""
    return {name: getattr(state, name) for name in _DIALOG_FIELDS}


def dialog_from(snapshot: DialogFields) -> Dialog:
    """The dialog a machine's snapshot carries."""
    return Dialog(**dialog_fields(snapshot))
