"""Digest access authentication for SIP (RFC 7616, RFC 3261 section 22), sans-IO.

Three parts: parsing a challenge (``WWW-Authenticate`` / ``Proxy-Authenticate``) into a
``Challenge``; ``DigestClient``, which answers challenges the proxy sends us and pre-authorises
later requests; ``DigestVerifier``, which challenges and checks requests sent to us, with
stateless nonces (timestamp + HMAC) and replay protection by nonce count.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sipside.errors import SipError
from sipside.message import SipRequest, SipResponse

__all__ = [
    "ALGORITHMS",
    "AuthenticationError",
    "Authorized",
    "Challenge",
    "Credentials",
    "DigestClient",
    "DigestVerifier",
    "Rechallenge",
    "Rejected",
    "Verdict",
    "compute_response",
    "parse_auth_params",
    "parse_challenge",
]

# RFC 7616 3.3 / RFC 8760: algorithm name -> hash; "-sess" variants share the hash.
_HASHES: dict[str, Callable[[bytes], str]] = {
    "MD5": lambda data: hashlib.md5(data).hexdigest(),
    "SHA-256": lambda data: hashlib.sha256(data).hexdigest(),
}
ALGORITHMS = ("MD5", "MD5-sess", "SHA-256", "SHA-256-sess")
_CANONICAL = {name.lower(): name for name in ALGORITHMS}


class AuthenticationError(SipError):
    """A challenge cannot be answered: unsupported algorithm, no credentials, bad syntax."""


def parse_auth_params(value: str) -> tuple[str, dict[str, str]]:
    """Split ``Scheme k=v, k="v"`` into the scheme and a dict of lower-cased parameter names.

    Quoted values may hold commas (``qop="auth,auth-int"``), which is why sipmessage's
    splitter is not used here. Raises ``AuthenticationError`` on malformed input.
    """
    text = value.strip()
    scheme, _, rest = text.partition(" ")
    if not scheme or not rest.strip():
        raise AuthenticationError(f"malformed auth header: {value!r}")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t,":
            i += 1
        if i >= n:
            break
        eq = rest.find("=", i)
        if eq < 0:
            raise AuthenticationError(f"auth parameter without value in {value!r}")
        name = rest[i:eq].strip().lower()
        i = eq + 1
        while i < n and rest[i] in " \t":
            i += 1
        if i < n and rest[i] == '"':
            i += 1
            chars: list[str] = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(rest[i])
                i += 1
            if i >= n:
                raise AuthenticationError(f"unterminated quoted string in {value!r}")
            i += 1
            param = "".join(chars)
        else:
            end = rest.find(",", i)
            end = n if end < 0 else end
            param = rest[i:end].strip()
            i = end
        if not name:
            raise AuthenticationError(f"empty auth parameter name in {value!r}")
        params[name] = param
    return scheme, params


@dataclass(frozen=True, slots=True)
class Challenge:
    """One Digest challenge from a 401 (``WWW-Authenticate``) or 407 (``Proxy-Authenticate``)."""

    realm: str
    nonce: str
    opaque: str | None = None
    algorithm: str = "MD5"
    qop: tuple[str, ...] = ()
    stale: bool = False
    proxy: bool = False


def parse_challenge(value: str, *, proxy: bool = False) -> Challenge:
    """Parse one challenge header value; unsupported algorithms raise ``AuthenticationError``."""
    scheme, params = parse_auth_params(value)
    if scheme.lower() != "digest":
        raise AuthenticationError(f"unsupported auth scheme {scheme!r}")
    if "realm" not in params or "nonce" not in params:
        raise AuthenticationError("digest challenge without realm or nonce")
    # RFC 7616 3.3: an absent algorithm means MD5.
    algorithm = _CANONICAL.get(params.get("algorithm", "MD5").lower())
    if algorithm is None:
        raise AuthenticationError(f"unsupported digest algorithm {params['algorithm']!r}")
    qop = tuple(q.strip().lower() for q in params.get("qop", "").split(",") if q.strip())
    return Challenge(
        realm=params["realm"],
        nonce=params["nonce"],
        opaque=params.get("opaque"),
        algorithm=algorithm,
        qop=qop,
        stale=params.get("stale", "").lower() == "true",
        proxy=proxy,
    )


def compute_response(
    *,
    algorithm: str,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    qop: str | None = None,
    nc: str = "00000001",
    cnonce: str = "",
    body: bytes = b"",
) -> str:
    """The ``response`` value of RFC 7616 3.4.1 (RFC 2617 3.2.2.1 without qop)."""
    base = algorithm.removesuffix("-sess")
    h = _HASHES.get(base)
    if h is None or algorithm not in ALGORITHMS:
        raise AuthenticationError(f"unsupported digest algorithm {algorithm!r}")
    ha1 = h(f"{username}:{realm}:{password}".encode())
    if algorithm.endswith("-sess"):
        # RFC 7616 3.4.2: session variant hashes the nonce and cnonce into A1.
        ha1 = h(f"{ha1}:{nonce}:{cnonce}".encode())
    if qop == "auth-int":
        ha2 = h(f"{method}:{uri}:".encode() + h(body).encode())
    else:
        ha2 = h(f"{method}:{uri}".encode())
    if qop is None:
        # RFC 2069 compatibility (RFC 3261 22.4 allows servers without qop).
        return h(f"{ha1}:{nonce}:{ha2}".encode())
    return h(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}".encode())


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class Credentials:
    """A username and password; ``realm`` None means "for any realm"."""

    username: str
    password: str
    realm: str | None = None


def _new_cnonce() -> str:
    return secrets.token_hex(8)


class DigestClient:
    """Answers Digest challenges and pre-authorises later requests for the realms it has seen."""

    __slots__ = ("_cnonce", "_credentials", "_last", "_nonce_counts")

    def __init__(
        self,
        credentials: Credentials | Iterable[Credentials],
        *,
        cnonce: Callable[[], str] = _new_cnonce,
    ) -> None:
        items = [credentials] if isinstance(credentials, Credentials) else list(credentials)
        self._credentials = items
        self._cnonce = cnonce
        # (realm, nonce) -> last nonce count sent; realm -> last challenge seen.
        self._nonce_counts: dict[tuple[str, str], int] = {}
        self._last: dict[str, Challenge] = {}

    def credentials_for(self, realm: str) -> Credentials | None:
        """The credentials configured for ``realm``, else the realm-less ones."""
        fallback = None
        for cred in self._credentials:
            if cred.realm == realm:
                return cred
            if cred.realm is None and fallback is None:
                fallback = cred
        return fallback

    def remember(self, challenge: Challenge) -> None:
        """Keep ``challenge`` so later requests to its realm are pre-authorised."""
        self._last[challenge.realm] = challenge

    def authorization(
        self, challenge: Challenge, method: str, uri: str, body: bytes = b""
    ) -> tuple[str, str]:
        """Header name and value answering ``challenge`` for one request."""
        cred = self.credentials_for(challenge.realm)
        if cred is None:
            raise AuthenticationError(f"no credentials for realm {challenge.realm!r}")
        key = (challenge.realm, challenge.nonce)
        count = self._nonce_counts.get(key, 0) + 1
        self._nonce_counts = {k: v for k, v in self._nonce_counts.items() if k[0] != key[0]}
        self._nonce_counts[key] = count
        # Prefer auth; auth-int only when it is the sole option (RFC 7616 3.4).
        if not challenge.qop:
            qop = None
        elif "auth" in challenge.qop:
            qop = "auth"
        elif "auth-int" in challenge.qop:
            qop = "auth-int"
        else:
            raise AuthenticationError(f"unsupported qop {challenge.qop!r}")
        nc = f"{count:08x}"
        cnonce = self._cnonce() if qop or challenge.algorithm.endswith("-sess") else ""
        response = compute_response(
            algorithm=challenge.algorithm,
            username=cred.username,
            realm=challenge.realm,
            password=cred.password,
            method=method,
            uri=uri,
            nonce=challenge.nonce,
            qop=qop,
            nc=nc,
            cnonce=cnonce,
            body=body,
        )
        parts = [
            f"username={_quote(cred.username)}",
            f"realm={_quote(challenge.realm)}",
            f"nonce={_quote(challenge.nonce)}",
            f"uri={_quote(uri)}",
            f"response={_quote(response)}",
            f"algorithm={challenge.algorithm}",
        ]
        if challenge.opaque is not None:
            parts.append(f"opaque={_quote(challenge.opaque)}")
        if qop is not None:
            parts += [f"qop={qop}", f"nc={nc}", f"cnonce={_quote(cnonce)}"]
        name = "Proxy-Authorization" if challenge.proxy else "Authorization"
        return name, "Digest " + ", ".join(parts)

    def answer(
        self,
        challenges: Iterable[tuple[str, str]],
        method: str,
        uri: str,
        body: bytes = b"",
    ) -> list[tuple[str, str]]:
        """Headers answering a 401/407 whose ``(name, value)`` challenge headers are given.

        Per realm the first challenge with a supported algorithm wins (RFC 8760 2.4: the
        server lists its preferred algorithm first). Raises if no challenge can be answered.
        """
        chosen: dict[str, Challenge] = {}
        errors: list[str] = []
        for name, value in challenges:
            proxy = name.lower() == "proxy-authenticate"
            if not proxy and name.lower() != "www-authenticate":
                continue
            try:
                challenge = parse_challenge(value, proxy=proxy)
            except AuthenticationError as exc:
                errors.append(str(exc))
                continue
            if challenge.realm not in chosen and self.credentials_for(challenge.realm):
                chosen[challenge.realm] = challenge
        if not chosen:
            raise AuthenticationError("no answerable challenge: " + ("; ".join(errors) or "none"))
        headers = []
        for challenge in chosen.values():
            self.remember(challenge)
            headers.append(self.authorization(challenge, method, uri, body))
        return headers

    def preauthorize(self, method: str, uri: str, body: bytes = b"") -> list[tuple[str, str]]:
        """Headers for a new request, reusing the last challenge of each realm seen."""
        return [self.authorization(c, method, uri, body) for c in self._last.values()]


@dataclass(frozen=True, slots=True)
class Authorized:
    """The request carries valid credentials of ``username``."""

    username: str


@dataclass(frozen=True, slots=True)
class Rechallenge:
    """Answer 401 with this ``WWW-Authenticate`` value (``stale`` says why)."""

    challenge: str
    stale: bool = False


@dataclass(frozen=True, slots=True)
class Rejected:
    """Answer ``status`` (400 or 403): the credentials are malformed or wrong."""

    status: int
    reason: str


Verdict = Authorized | Rechallenge | Rejected

_NONCE_HEAD = struct.Struct(">d8s")  # issue time, random salt
_MAX_COUNTS_PER_NONCE = 1024


class DigestVerifier:
    """Challenges and verifies requests sent to us (RFC 3261 22.3), with stateless nonces."""

    __slots__ = ("_algorithm", "_lookup", "_realm", "_secret", "_seen", "_ttl")

    def __init__(
        self,
        realm: str,
        lookup_password: Callable[[str], str | None],
        secret: bytes,
        nonce_ttl: float = 300.0,
        *,
        algorithm: str = "MD5",
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise AuthenticationError(f"unsupported digest algorithm {algorithm!r}")
        self._realm = realm
        self._lookup = lookup_password
        self._secret = secret
        self._ttl = nonce_ttl
        self._algorithm = algorithm
        # nonce -> (issue time, nonce counts already used): replay protection.
        self._seen: dict[str, tuple[float, set[int]]] = {}

    def _mac(self, head: bytes) -> bytes:
        return hmac.new(self._secret, head + self._realm.encode(), hashlib.sha256).digest()[:16]

    def new_nonce(self, now: float) -> str:
        """A nonce holding its issue time, a salt and an HMAC over both."""
        head = _NONCE_HEAD.pack(now, secrets.token_bytes(8))
        return base64.urlsafe_b64encode(head + self._mac(head)).decode().rstrip("=")

    def _nonce_time(self, nonce: str) -> float | None:
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (ValueError, TypeError):
            return None
        if len(raw) != _NONCE_HEAD.size + 16:
            return None
        head, mac = raw[: _NONCE_HEAD.size], raw[_NONCE_HEAD.size :]
        if not hmac.compare_digest(mac, self._mac(head)):
            return None
        issued: float = _NONCE_HEAD.unpack(head)[0]
        return issued

    def challenge(self, now: float, *, stale: bool = False) -> str:
        """A ``WWW-Authenticate`` value with a fresh nonce."""
        value = (
            f'Digest realm={_quote(self._realm)}, nonce="{self.new_nonce(now)}", '
            f'algorithm={self._algorithm}, qop="auth"'
        )
        return value + (", stale=true" if stale else "")

    def _prune(self, now: float) -> None:
        expired = [n for n, (t, _) in self._seen.items() if t + self._ttl < now]
        for nonce in expired:
            del self._seen[nonce]

    def verify(
        self, header_value: str | None, method: str, uri: str, now: float, body: bytes = b""
    ) -> Verdict:
        """Check an ``Authorization`` value for a request (``None`` when it had none)."""
        self._prune(now)
        if header_value is None:
            return Rechallenge(self.challenge(now))
        try:
            scheme, p = parse_auth_params(header_value)
        except AuthenticationError as exc:
            return Rejected(400, str(exc))
        if scheme.lower() != "digest" or p.get("realm") != self._realm:
            # Credentials for another realm or scheme: offer ours (RFC 3261 22.3).
            return Rechallenge(self.challenge(now))
        missing = [k for k in ("username", "nonce", "uri", "response") if k not in p]
        if missing:
            return Rejected(400, "missing digest parameter " + ", ".join(missing))
        algorithm = _CANONICAL.get(p.get("algorithm", "MD5").lower())
        if algorithm != self._algorithm:
            return Rechallenge(self.challenge(now))
        qop = p.get("qop")
        if qop not in ("auth", "auth-int") or "nc" not in p or "cnonce" not in p:
            # We always offer qop=auth; without it there is no nonce count to stop replays.
            return Rejected(400, "digest response without qop, nc or cnonce")
        # RFC 2617 3.2.2.5: the digest-uri must be the Request-URI.
        if p["uri"] != uri:
            return Rejected(400, "digest uri does not match the Request-URI")
        try:
            nc = int(p["nc"], 16)
        except ValueError:
            return Rejected(400, "malformed nonce count")
        issued = self._nonce_time(p["nonce"])
        if issued is None:
            return Rechallenge(self.challenge(now))
        password = self._lookup(p["username"])
        if password is None:
            return Rejected(403, "unknown user or wrong password")
        expected = compute_response(
            algorithm=algorithm,
            username=p["username"],
            realm=self._realm,
            password=password,
            method=method,
            uri=uri,
            nonce=p["nonce"],
            qop=qop,
            nc=p["nc"],
            cnonce=p["cnonce"],
            body=body,
        )
        if not hmac.compare_digest(expected, p["response"].lower()):
            return Rejected(403, "unknown user or wrong password")
        if issued + self._ttl < now or issued > now + 1.0:
            # RFC 7616 3.3: right password, old nonce -> stale=true, the client retries silently.
            return Rechallenge(self.challenge(now, stale=True), stale=True)
        _, used = self._seen.setdefault(p["nonce"], (issued, set()))
        if nc in used or len(used) >= _MAX_COUNTS_PER_NONCE:
            # A nonce count seen before is a replay (RFC 7616 5.12); a new nonce lets an honest
            # client continue.
            return Rechallenge(self.challenge(now, stale=True), stale=True)
        used.add(nc)
        return Authorized(p["username"])


def retry_with_credentials(
    client: DigestClient, request: SipRequest, challenge: SipResponse, cseq: int
) -> SipRequest:
    """``request`` again with CSeq ``cseq`` and credentials answering the 401/407 ``challenge``
    (RFC 3261 22.2). Raises AuthenticationError when no challenge can be answered."""
    challenges = [
        (name, value)
        for name, value in challenge.headers
        if name.lower() in ("www-authenticate", "proxy-authenticate")
    ]
    auth = client.answer(challenges, request.method, request.uri, request.body)
    retry = request.replace_headers("CSeq", [f"{cseq} {request.method}"])
    for name, value in auth:
        retry = retry.replace_headers(name, [value])
    return retry
