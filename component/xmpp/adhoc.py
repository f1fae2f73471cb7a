"""XEP-0050 ad-hoc commands with XEP-0004 forms on the component domain (DESIGN 9).

The link hands every iq to the component domain to :meth:`AdhocCommands.take` before its own
responder: the commands list (disco#items of node ``http://jabber.org/protocol/commands``), a
command's disco#info, and ``<command/>`` requests are taken here; the rest is the responder's.
The commands themselves are ``component.admin``'s and see only values: here the stanzas become
a node, a requester and form values, and the steps that come back become stanzas. The list is
empty for anyone not in ``admin.jids``, and running a command is ``forbidden`` for them.

A command that asks for a form names its session by a signed id (node, requester and expiry,
under a key every instance derives from the component secret), so the form may be submitted
to any instance of the gateway (DESIGN 9: ejabberd hands each iq to any live connection); an
instance refuses a session it has seen ended, so one form is not run twice there.

slixmpp's xep_0050 and xep_0004 plugins are not used: the link keeps slixmpp's stanza objects
and plugins out of the stream (see ``component.xmpp.link``), so the elements are read directly.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Callable

from component.addresses import Jid
from component.admin.model import AdminCommands, Ask, Done, Form, FormField, Step
from component.errors import Refusal
from component.logs import get_logger
from component.ports import NO_METRICS, Metrics
from component.runtime.tasks import TaskOwner
from component.store import StoreUnavailable
from component.xmpp.iq import NS_DISCO_INFO, NS_DISCO_ITEMS
from component.xmpp.stanzas import Rejected, attr, elem, error_for, format_error, format_iq
from sipside.xmlsafe import attr_escape, text_escape

NS_COMMANDS = "http://jabber.org/protocol/commands"
NS_DATA = "jabber:x:data"
MAX_SESSIONS = 256  # ended sessions remembered; the oldest is forgotten beyond this
SESSION_LIFE = 600.0  # seconds a form may wait to be submitted
MAX_VALUES = 64  # values read from one submitted form
MAX_VALUE = 4096  # characters kept of one submitted value

log = get_logger("component.xmpp.adhoc")

Write = Callable[[str], bool]


class AdhocCommands:
    """The XEP-0050 side of the admin commands on the component domain."""

    def __init__(
        self,
        desk: AdminCommands,
        *,
        metrics: Metrics = NO_METRICS,
        key: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.desk = desk
        self.metrics = metrics
        self._key = key if key is not None else secrets.token_bytes(32)
        self._clock = clock
        self._nodes = {info.node: info.name for info in desk.commands()}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._tasks = TaskOwner("adhoc_command_failed")

    def take(
        self, iq: ET.Element, type_: str | None, requester: str, to: Jid, write: Write
    ) -> bool:
        """Answer ``iq`` (get or set, with an id) if it is about the commands; raises
        ``Rejected`` (answered by the link) for a request refused at once."""
        if to.local or to.resource:
            return False  # commands live on the domain only
        payload = next(iter(iq), None)
        if payload is None:
            return False
        node = payload.get("node")
        if type_ == "get" and payload.tag == f"{{{NS_DISCO_ITEMS}}}query" and node == NS_COMMANDS:
            write(self._result(iq, to, requester, self._items(to.full, requester)))
            return True
        if type_ == "get" and payload.tag == f"{{{NS_DISCO_INFO}}}query" and node in self._nodes:
            self._check(requester)
            info = (
                '<identity category="automation" type="command-node"'
                f"{attr('name', self._nodes[node])}/>"
                f'<feature var="{NS_COMMANDS}"/><feature var="{NS_DATA}"/>'
            )
            write(self._result(iq, to, requester, _query(NS_DISCO_INFO, node, info)))
            return True
        if payload.tag != f"{{{NS_COMMANDS}}}command":
            return False
        if type_ != "set":
            raise Rejected("bad-request", "modify", "a command is run with an iq of type set")
        self._check(requester)
        if node not in self._nodes:
            raise Rejected("item-not-found", "cancel", "no such command")
        self._tasks.own(self._run(iq, payload, node, requester, to.full, write))
        return True

    def _check(self, requester: str) -> None:
        if not self.desk.allowed(requester):
            raise Rejected("forbidden", "auth", "only the gateway's administrators run commands")

    def _items(self, domain: str, requester: str) -> str:
        """XEP-0050 2.2: the commands as disco items; none for whoever may not run them."""
        items = (
            "".join(
                f'<item jid="{attr_escape(domain)}" node="{attr_escape(node)}"'
                f' name="{attr_escape(name)}"/>'
                for node, name in self._nodes.items()
            )
            if self.desk.allowed(requester)
            else ""
        )
        return _query(NS_DISCO_ITEMS, NS_COMMANDS, items)

    def _result(self, iq: ET.Element, to: Jid, requester: str, payload: str) -> str:
        return format_iq("result", to.full, requester, iq.get("id") or "", payload)

    async def _run(
        self,
        iq: ET.Element,
        command: ET.Element,
        node: str,
        requester: str,
        domain: str,
        write: Write,
    ) -> None:
        iq_id = iq.get("id") or ""
        try:
            answer = await self._answer(command, node, requester)
        except StoreUnavailable:
            refusal: Refusal = Rejected("resource-constraint", "wait", "the database is down")
        except Refusal as exc:
            refusal = exc
        except Exception:
            # RFC 6120 8.2.3: even our own failure gets an answer, never silence.
            log.exception("adhoc_command_crashed", node=node, jid=requester)
            refusal = Rejected("internal-server-error", "wait", "the command failed")
        else:
            write(format_iq("result", domain, requester, iq_id, answer))
            return
        log.info("adhoc_command_refused", jid=requester, condition=refusal.xmpp_condition)
        err = error_for(refusal, "iq", sender=domain, recipient=requester, id_=iq_id)
        if write(format_error(err)):
            self.metrics.xmpp_error(err.condition)

    async def _answer(self, command: ET.Element, node: str, requester: str) -> str:
        """The ``<command/>`` answering a request: a first step, a submitted form, a cancel."""
        action = command.get("action") or "execute"
        session_id = command.get("sessionid")
        if session_id is None:
            if action == "cancel":
                raise Rejected("bad-request", "modify", "nothing to cancel")
            step = await self.desk.start(node, requester)
            return self._step(node, self._new_session(node, requester), requester, step)
        if not self._valid(session_id, node, requester):
            raise Rejected("bad-request", "modify", "no such session")
        self._ended[session_id] = None
        while len(self._ended) > MAX_SESSIONS:
            self._ended.popitem(last=False)
        if action == "cancel":
            return _command(node, session_id, "canceled")
        if action == "prev":
            raise Rejected("bad-request", "modify", "these commands have one form")
        step = await self.desk.submit(node, requester, _submitted(command))
        return self._step(node, session_id, requester, step)

    def _sign(self, node: str, requester: str, nonce: str, expires: int) -> str:
        text = f"{node}\n{requester}\n{nonce}\n{expires}".encode()
        return hmac.new(self._key, text, hashlib.sha256).hexdigest()[:32]

    def _new_session(self, node: str, requester: str) -> str:
        nonce, expires = secrets.token_hex(8), int(self._clock() + SESSION_LIFE)
        return f"{nonce}-{expires}-{self._sign(node, requester, nonce, expires)}"

    def _valid(self, session_id: str, node: str, requester: str) -> bool:
        """``session_id`` was made here or by another instance for ``node`` run by
        ``requester``, has not expired, and has not ended here."""
        nonce, _, rest = session_id.partition("-")
        expires, _, mac = rest.partition("-")
        if not expires.isdigit() or int(expires) < self._clock() or session_id in self._ended:
            return False
        return hmac.compare_digest(mac, self._sign(node, requester, nonce, int(expires)))

    def _step(self, node: str, session_id: str, requester: str, step: Step) -> str:
        if isinstance(step, Ask):
            inner = '<actions execute="complete"><complete/></actions>' + _form(step.form)
            return _command(node, session_id, "executing", inner)
        assert isinstance(step, Done)
        inner = (f'<note type="info">{text_escape(step.note)}</note>' if step.note else "") + (
            _form(step.form) if step.form is not None else ""
        )
        return _command(node, session_id, "completed", inner)

    async def drain(self, timeout: float) -> None:
        """Let commands being run finish (shutdown)."""
        await self._tasks.wait(timeout)


def _query(ns: str, node: str, inner: str) -> str:
    return f'<query xmlns="{ns}" node="{attr_escape(node)}">{inner}</query>'


def _command(node: str, session_id: str, status: str, inner: str = "") -> str:
    return (
        f'<command xmlns="{NS_COMMANDS}" node="{attr_escape(node)}"'
        f' sessionid="{attr_escape(session_id)}" status="{status}">{inner}</command>'
    )


def _form(form: Form) -> str:
    """A XEP-0004 data form of type form or result."""
    kind = "result" if form.result else "form"
    head = elem("title", form.title) + elem("instructions", form.instructions)
    return f'<x xmlns="{NS_DATA}" type="{kind}">{head}{"".join(map(_field, form.fields))}</x>'


def _field(field: FormField) -> str:
    inner = "".join(elem("value", value) for value in field.values)
    inner += "".join(
        f"<option{attr('label', label)}>{elem('value', value)}</option>"
        for label, value in field.options
    )
    if field.required:
        inner += "<required/>"
    head = f'type="{field.type}"{attr("var", field.var)}{attr("label", field.label)}'
    return f"<field {head}>{inner}</field>"


def _submitted(command: ET.Element) -> dict[str, list[str]]:
    """The values of the submitted form in ``command`` (XEP-0004 3.1, type submit)."""
    form = command.find(f"{{{NS_DATA}}}x")
    if form is None or form.get("type") not in ("submit", None):
        raise Rejected("bad-request", "modify", "the command needs its form submitted")
    values: dict[str, list[str]] = {}
    count = 0
    for field in form.findall(f"{{{NS_DATA}}}field"):
        var = field.get("var")
        if not var:
            continue
        for value in field.findall(f"{{{NS_DATA}}}value"):
            count += 1
            if count > MAX_VALUES:
                raise Rejected("not-acceptable", "modify", "too many values in the form")
            values.setdefault(var, []).append((value.text or "")[:MAX_VALUE])
    return values


__all__ = ["NS_COMMANDS", "NS_DATA", "AdhocCommands"]
