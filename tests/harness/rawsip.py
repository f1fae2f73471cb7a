"""A raw SIP peer on a UDP socket: stands in for the gateway where the real one is not wanted.

It parses just enough (start line, header fields, body) to check what a proxy routed and to
answer it; it is a test tool, not a SIP stack.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
from dataclasses import dataclass

from tests.harness.values import LOOPBACK


@dataclass(frozen=True, slots=True)
class RawSip:
    """One SIP message as text: start line, header fields in order, body."""

    start: str
    headers: tuple[tuple[str, str], ...]
    body: str
    source: tuple[str, int]

    @classmethod
    def parse(cls, data: bytes, source: tuple[str, int]) -> RawSip:
        """Split a datagram into start line, unfolded header fields and body."""
        text = data.decode("utf-8", errors="replace")
        head, _, body = text.partition("\r\n\r\n")
        lines = head.split("\r\n")
        fields: list[list[str]] = []
        for line in lines[1:]:
            if line[:1] in (" ", "\t") and fields:
                fields[-1][1] += " " + line.strip()
            elif ":" in line:
                name, value = line.split(":", 1)
                fields.append([name.strip(), value.strip()])
        return cls(lines[0], tuple((n, v) for n, v in fields), body, source)

    @property
    def method(self) -> str:
        """The request method ("" for a response)."""
        return "" if self.start.startswith("SIP/2.0") else self.start.split(" ", 1)[0]

    @property
    def uri(self) -> str:
        """The Request-URI of a request."""
        return self.start.split(" ")[1]

    @property
    def status(self) -> int:
        """The status code of a response (0 for a request)."""
        return int(self.start.split(" ")[1]) if self.start.startswith("SIP/2.0") else 0

    def header(self, name: str) -> str | None:
        """The first value of a header field (case-insensitive name)."""
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        """Every value of a header field, in order."""
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def response(self, status: int, reason: str, extra: str = "") -> bytes:
        """A response to this request (RFC 3261 8.2.6: copy Via, From, To, Call-ID, CSeq)."""
        lines = [f"SIP/2.0 {status} {reason}"]
        lines += [f"Via: {v}" for v in self.all("Via")]
        to = self.header("To") or ""
        if ";tag=" not in to:
            to += ";tag=" + secrets.token_hex(4)
        lines += [f"From: {self.header('From')}", f"To: {to}"]
        lines += [f"Call-ID: {self.header('Call-ID')}", f"CSeq: {self.header('CSeq')}"]
        if extra:
            lines.append(extra)
        lines.append("Content-Length: 0")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, queue: asyncio.Queue[RawSip]) -> None:
        self.queue = queue

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data.strip():  # keep-alive CRLFs are not messages
            self.queue.put_nowait(RawSip.parse(data, addr))


class RawSipPeer:
    """A UDP socket on 127.0.0.1 that queues every SIP message it receives."""

    def __init__(self, transport: asyncio.DatagramTransport, port: int) -> None:
        self.transport = transport
        self.port = port
        self.received: asyncio.Queue[RawSip] = asyncio.Queue()

    @classmethod
    async def open(cls, port: int = 0) -> RawSipPeer:
        """Bind a UDP socket (port 0: any free port)."""
        queue: asyncio.Queue[RawSip] = asyncio.Queue()
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Protocol(queue), local_addr=(LOOPBACK, port)
        )
        peer = cls(transport, int(transport.get_extra_info("sockname")[1]))
        peer.received = queue
        return peer

    async def next(self, timeout: float = 5.0) -> RawSip:
        """The next message received."""
        return await asyncio.wait_for(self.received.get(), timeout)

    def send(self, data: bytes, to: tuple[str, int]) -> None:
        """Send one datagram."""
        self.transport.sendto(data, to)

    def request(
        self,
        method: str,
        uri: str,
        from_uri: str,
        to_uri: str,
        body: str = "",
        content_type: str = "text/plain",
        cseq: int = 1,
        call_id: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> bytes:
        """A request as this peer would send it (own Via, From tag, Max-Forwards)."""
        payload = body.encode()
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/UDP {LOOPBACK}:{self.port};branch=z9hG4bK{secrets.token_hex(8)}",
            "Max-Forwards: 70",
            f"From: <{from_uri}>;tag={secrets.token_hex(4)}",
            f"To: <{to_uri}>",
            f"Call-ID: {call_id or secrets.token_hex(8)}@{LOOPBACK}",
            f"CSeq: {cseq} {method}",
            f"Contact: <sip:{LOOPBACK}:{self.port}>",
            *extra,
        ]
        if payload:
            lines.append(f"Content-Type: {content_type}")
        lines.append(f"Content-Length: {len(payload)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload

    def close(self) -> None:
        """Close the socket."""
        self.transport.close()


def digest_authorization(
    challenge: str, method: str, uri: str, user: str, password: str, header: str = "Proxy"
) -> str:
    """A `Proxy-Authorization` (or `Authorization`) field answering a Digest challenge.

    Handles MD5 and SHA-256 with qop=auth or without qop (RFC 7616 3.4.1), enough to check
    that a proxy's challenge mode works; the gateway has its own implementation.
    """
    params = {k: (q or t) for k, q, t in re.findall(r'(\w+)=(?:"([^"]*)"|([^,\s]*))', challenge)}
    algorithm = params.get("algorithm", "MD5")
    hash_name = {"MD5": "md5", "SHA-256": "sha256"}[algorithm.upper()]

    def h(text: str) -> str:
        return hashlib.new(hash_name, text.encode()).hexdigest()

    realm, nonce = params["realm"], params["nonce"]
    ha1 = h(f"{user}:{realm}:{password}")
    ha2 = h(f"{method}:{uri}")
    fields = [
        f'username="{user}"',
        f'realm="{realm}"',
        f'nonce="{nonce}"',
        f'uri="{uri}"',
        f"algorithm={algorithm}",
    ]
    if "auth" in params.get("qop", "").split(","):
        cnonce, nc = secrets.token_hex(8), "00000001"
        response = h(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")
        fields += ["qop=auth", f"nc={nc}", f'cnonce="{cnonce}"']
    else:
        response = h(f"{ha1}:{nonce}:{ha2}")
    fields.append(f'response="{response}"')
    if "opaque" in params:
        fields.append(f'opaque="{params["opaque"]}"')
    name = "Proxy-Authorization" if header == "Proxy" else "Authorization"
    return f"{name}: Digest " + ", ".join(fields)
