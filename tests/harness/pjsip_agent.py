"""A PJSIP user agent process for tests, driven by JSON lines on stdin; events on stdout.

Run as `python3 pjsip_agent.py LOGFILE`. One pjsua2 Endpoint per process (SERVERS.md), polled
from this thread (threadCnt 0, mainThreadOnly), null audio, at most 8 accounts. PJSIP's own
console output goes to stderr so stdout carries only the protocol.

Commands (each with an "id", answered by {"reply": id, "ok": ..., ...}):
  add_account {user, domain, proxy, transport: udp|tcp, register, publish, expires}
  send_message {acc, to, body, content_type}       -> later event message_status
  send_typing {acc, to, typing: bool}              (RFC 3994 isComposing)
  subscribe / unsubscribe {acc, uri}               -> later events buddy_state
  publish {acc, status: online|away|busy|offline, note}
  register / unregister {acc}                      -> later event reg_state
  quit
Events: reg_state, message, message_status, typing, buddy_state, log.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
from typing import Any

import pjsua2 as pj

MAX_ACCOUNTS = 8  # SERVERS.md: the 9th pjsua_acc_add aborts the whole process

_out = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # PJSIP writes to fd 1: send that to the log, keep the protocol clean


def emit(obj: dict[str, Any]) -> None:
    """Write one protocol line to the test process."""
    _out.write(json.dumps(obj) + "\n")
    _out.flush()


def parse_headers(whole: str) -> list[list[str]]:
    """Header fields of a raw SIP message, unfolded, in order (name, value)."""
    head = whole.replace("\r\n", "\n").split("\n\n", 1)[0]
    lines = head.split("\n")[1:]
    fields: list[list[str]] = []
    for line in lines:
        if line[:1] in (" ", "\t") and fields:
            fields[-1][1] += " " + line.strip()
        elif ":" in line:
            name, value = line.split(":", 1)
            fields.append([name.strip(), value.strip()])
    return fields


def free_port_pair() -> int:
    """A loopback port free for both UDP and TCP right now."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port


class Buddy(pj.Buddy):  # type: ignore[misc]
    """A remote URI: target of MESSAGEs and, when subscribed, of presence."""

    def __init__(self, acc: Account, uri: str) -> None:
        super().__init__()
        self.acc = acc
        self.uri = uri

    def report(self) -> None:
        info = self.getInfo()
        status = info.presStatus
        emit(
            {
                "event": "buddy_state",
                "acc": self.acc.index,
                "uri": self.uri,
                "online": status.status == pj.PJSUA_BUDDY_STATUS_ONLINE,
                "status": {
                    pj.PJSUA_BUDDY_STATUS_ONLINE: "online",
                    pj.PJSUA_BUDDY_STATUS_OFFLINE: "offline",
                }.get(status.status, "unknown"),
                "status_text": status.statusText,
                "note": status.note,
                "activity": {
                    pj.PJRPID_ACTIVITY_AWAY: "away",
                    pj.PJRPID_ACTIVITY_BUSY: "busy",
                }.get(status.activity, "unknown"),
                "sub_state": info.subStateName,
                "term_code": info.subTermCode,
                "term_reason": info.subTermReason,
            }
        )

    def onBuddyState(self) -> None:
        self.report()

    def onBuddyEvSubState(self, prm: Any) -> None:
        self.report()


class Account(pj.Account):  # type: ignore[misc]
    """One SIP identity of the agent (callback names are pjsua2's)."""

    def __init__(self, index: int, uri: str) -> None:
        super().__init__()
        self.index = index
        self.uri = uri
        self.buddies: dict[str, Buddy] = {}

    def buddy(self, uri: str) -> Buddy:
        found = self.buddies.get(uri)
        if found is None:
            cfg = pj.BuddyConfig()
            cfg.uri = uri
            cfg.subscribe = False
            found = Buddy(self, uri)
            found.create(self, cfg)
            self.buddies[uri] = found
        return found

    def onRegState(self, prm: Any) -> None:
        emit(
            {
                "event": "reg_state",
                "acc": self.index,
                "code": prm.code,
                "reason": prm.reason,
                "expiration": prm.expiration,
            }
        )

    def onInstantMessage(self, prm: Any) -> None:
        emit(
            {
                "event": "message",
                "acc": self.index,
                "from": prm.fromUri,
                "to": prm.toUri,
                "contact": prm.contactUri,
                "content_type": prm.contentType,
                "body": prm.msgBody,
                "headers": parse_headers(prm.rdata.wholeMsg),
            }
        )

    def onTypingIndication(self, prm: Any) -> None:
        emit(
            {
                "event": "typing",
                "acc": self.index,
                "from": prm.fromUri,
                "typing": bool(prm.isTyping),
            }
        )

    def onInstantMessageStatus(self, prm: Any) -> None:
        emit(
            {
                "event": "message_status",
                "acc": self.index,
                "to": prm.toUri,
                "code": prm.code,
                "reason": prm.reason,
            }
        )


class Agent:
    """The endpoint, its two transports and the accounts."""

    def __init__(self, log_file: str) -> None:
        self.ep = pj.Endpoint()
        self.ep.libCreate()
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0
        cfg.uaConfig.mainThreadOnly = True
        cfg.uaConfig.userAgent = "sipxmpp-test-pjsip"
        cfg.logConfig.level = 3
        cfg.logConfig.consoleLevel = 1
        cfg.logConfig.filename = log_file
        cfg.medConfig.noVad = True
        self.ep.libInit(cfg)
        self.transports = self.create_transports()
        self.ep.libStart()
        self.ep.audDevManager().setNullDev()
        self.accounts: list[Account] = []
        self.running = True

    def create_transports(self) -> dict[str, int]:
        """UDP and TCP on one port number of 127.0.0.1.

        RFC 3261 18.1.1: a proxy sends a request over 1300 bytes by TCP to the port the UA
        registered over UDP, so both must listen there.
        """
        for _ in range(20):
            port = free_port_pair()
            created: dict[str, int] = {}
            try:
                for name, kind in (
                    ("udp", pj.PJSIP_TRANSPORT_UDP),
                    ("tcp", pj.PJSIP_TRANSPORT_TCP),
                ):
                    tcfg = pj.TransportConfig()
                    tcfg.port = port
                    tcfg.boundAddress = "127.0.0.1"
                    tcfg.publicAddress = "127.0.0.1"
                    created[name] = self.ep.transportCreate(kind, tcfg)
            except pj.Error:
                for tid in created.values():
                    self.ep.transportClose(tid)
                continue  # someone took the port meanwhile
            return created
        raise RuntimeError("no port free for both UDP and TCP")

    def add_account(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if len(self.accounts) >= MAX_ACCOUNTS:
            raise ValueError(f"at most {MAX_ACCOUNTS} accounts per PJSIP process")
        transport = cmd.get("transport", "udp")
        domain = cmd["domain"]
        proxy = cmd["proxy"] + ";lr" + (";transport=tcp" if transport == "tcp" else "")
        cfg = pj.AccountConfig()
        cfg.idUri = f"sip:{cmd['user']}@{domain}"
        cfg.regConfig.registrarUri = f"sip:{domain}" + (
            ";transport=tcp" if transport == "tcp" else ""
        )
        cfg.regConfig.registerOnAdd = bool(cmd.get("register", True))
        cfg.regConfig.timeoutSec = int(cmd.get("expires", 300))
        cfg.regConfig.retryIntervalSec = 0  # no retries: a failure is a test result
        cfg.sipConfig.proxies.append(proxy)
        cfg.sipConfig.transportId = self.transports[transport]
        cfg.presConfig.publishEnabled = bool(cmd.get("publish", False))
        # Loopback only: no NAT tricks, the Contact is what the transport says.
        cfg.natConfig.sipStunUse = pj.PJSUA_STUN_USE_DISABLED
        cfg.natConfig.mediaStunUse = pj.PJSUA_STUN_USE_DISABLED
        cfg.natConfig.contactRewriteUse = 0
        cfg.natConfig.viaRewriteUse = 0
        cfg.natConfig.sdpNatRewriteUse = 0
        cfg.natConfig.udpKaIntervalSec = 0
        if cmd.get("password"):
            cred = pj.AuthCredInfo("digest", "*", cmd["user"], 0, cmd["password"])
            cfg.sipConfig.authCreds.append(cred)
        acc = Account(len(self.accounts), cfg.idUri)
        acc.create(cfg)
        self.accounts.append(acc)
        return {"acc": acc.index, "uri": acc.uri}

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "add_account":
            return self.add_account(cmd)
        if op == "quit":
            self.running = False
            return {}
        acc = self.accounts[int(cmd["acc"])]
        if op == "send_message":
            prm = pj.SendInstantMessageParam()
            prm.content = cmd["body"]
            prm.contentType = cmd.get("content_type", "text/plain")
            for name, value in cmd.get("headers", []):
                hdr = pj.SipHeader()
                hdr.hName = name
                hdr.hValue = value
                prm.txOption.headers.append(hdr)
            acc.buddy(cmd["to"]).sendInstantMessage(prm)
        elif op == "send_typing":
            prm = pj.SendTypingIndicationParam()
            prm.isTyping = bool(cmd["typing"])
            acc.buddy(cmd["to"]).sendTypingIndication(prm)
        elif op == "subscribe":
            acc.buddy(cmd["uri"]).subscribePresence(True)
        elif op == "unsubscribe":
            acc.buddy(cmd["uri"]).subscribePresence(False)
        elif op == "publish":
            status = pj.PresenceStatus()
            kind = cmd.get("status", "online")
            status.status = (
                pj.PJSUA_BUDDY_STATUS_OFFLINE if kind == "offline" else pj.PJSUA_BUDDY_STATUS_ONLINE
            )
            status.activity = {
                "away": pj.PJRPID_ACTIVITY_AWAY,
                "busy": pj.PJRPID_ACTIVITY_BUSY,
            }.get(kind, pj.PJRPID_ACTIVITY_UNKNOWN)
            status.note = cmd.get("note", "")
            status.statusText = cmd.get("note", "")
            acc.setOnlineStatus(status)
        elif op == "register":
            acc.setRegistration(True)
        elif op == "unregister":
            acc.setRegistration(False)
        else:
            raise ValueError(f"unknown op {op!r}")
        return {}

    def shutdown(self) -> None:
        # Unregister so the proxy does not keep forking to a dead contact.
        for acc in self.accounts:
            if acc.getInfo().regIsActive:
                acc.setRegistration(False)
        for _ in range(50):
            self.ep.libHandleEvents(20)
            if not any(acc.getInfo().regIsActive for acc in self.accounts):
                break


def main() -> None:
    """Poll PJSIP and stdin in turns until `quit` or end of input."""
    agent = Agent(sys.argv[1] if len(sys.argv) > 1 else "")
    emit({"event": "ready"})
    fd = sys.stdin.fileno()
    buffer = b""
    while agent.running:
        agent.ep.libHandleEvents(10)
        readable, _, _ = select.select([fd], [], [], 0)
        if not readable:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if not line.strip():
                continue
            cmd = json.loads(line)
            try:
                result = agent.handle(cmd)
            except Exception as exc:  # report any failure to the test; the agent keeps going
                emit({"reply": cmd.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            else:
                emit({"reply": cmd.get("id"), "ok": True, **result})
    agent.shutdown()
    emit({"event": "bye"})
    # libDestroy in a polled single-thread endpoint can block on pending transactions; the
    # registrations are gone already, so leave without it.
    os._exit(0)


if __name__ == "__main__":
    main()
