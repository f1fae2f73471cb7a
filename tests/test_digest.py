"""Digest authentication: RFC 7616 / RFC 2617 vectors, client behaviour, verifier verdicts."""

from __future__ import annotations

from typing import Any

import pytest

from sipside.digest import (
    AuthenticationError,
    Authorized,
    Challenge,
    Credentials,
    DigestClient,
    DigestVerifier,
    Rechallenge,
    Rejected,
    compute_response,
    parse_auth_params,
    parse_challenge,
)

# RFC 7616 3.9.1 (both responses are given there) and RFC 2617 3.5.
RFC7616: dict[str, Any] = {
    "username": "Mufasa",
    "realm": "http-auth@example.org",
    "password": "Circle of Life",
    "method": "GET",
    "uri": "/dir/index.html",
    "nonce": "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
    "qop": "auth",
    "nc": "00000001",
    "cnonce": "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
}
RFC2617: dict[str, Any] = {
    "username": "Mufasa",
    "realm": "testrealm@host.com",
    "password": "Circle Of Life",
    "method": "GET",
    "uri": "/dir/index.html",
    "nonce": "dcd98b7102dd2f0e8b11d0f600bfb0c093",
    "qop": "auth",
    "nc": "00000001",
    "cnonce": "0a4f113b",
}
RFC7616_CHALLENGE = (
    'Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm=SHA-256, '
    'nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", '
    'opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"'
)


@pytest.mark.parametrize(
    ("algorithm", "params", "expected"),
    [
        ("MD5", RFC7616, "8ca523f5e9506fed4657c9700eebdbec"),
        ("SHA-256", RFC7616, "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
        ("MD5", RFC2617, "6629fae49393a05397450978507c4ef1"),
    ],
)
def test_rfc_vectors(algorithm: str, params: dict[str, Any], expected: str) -> None:
    assert compute_response(algorithm=algorithm, **params) == expected


def test_sess_and_auth_int_change_the_response() -> None:
    base = compute_response(algorithm="MD5", **RFC7616)
    assert compute_response(algorithm="MD5-sess", **RFC7616) != base
    with_int: dict[str, Any] = {**RFC7616, "qop": "auth-int"}
    assert compute_response(algorithm="MD5", **with_int, body=b"x") != compute_response(
        algorithm="MD5", **with_int, body=b"y"
    )


def test_unsupported_algorithm_in_compute() -> None:
    with pytest.raises(AuthenticationError, match="SHA-512"):
        compute_response(algorithm="SHA-512-256", **RFC7616)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            RFC7616_CHALLENGE,
            Challenge(
                realm="http-auth@example.org",
                nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
                opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS",
                algorithm="SHA-256",
                qop=("auth", "auth-int"),
            ),
        ),
        ('Digest realm="r", nonce="n"', Challenge(realm="r", nonce="n")),
        (
            'digest  realm="a, b" ,nonce=xyz,stale=TRUE, algorithm=md5-SESS,qop=auth',
            Challenge(realm="a, b", nonce="xyz", algorithm="MD5-sess", qop=("auth",), stale=True),
        ),
        (
            'Digest realm="with \\"quote\\"", nonce="n", stale=false',
            Challenge(realm='with "quote"', nonce="n"),
        ),
    ],
)
def test_parse_challenge(value: str, expected: Challenge) -> None:
    assert parse_challenge(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('Digest realm="r", nonce="n", algorithm=SHA-512-256', "unsupported digest algorithm"),
        ('Basic realm="r"', "unsupported auth scheme"),
        ('Digest realm="r"', "without realm or nonce"),
        ("Digest", "malformed"),
        ('Digest realm="r, nonce=n', "unterminated"),
        ("Digest realm", "without value"),
    ],
)
def test_parse_challenge_errors(value: str, message: str) -> None:
    with pytest.raises(AuthenticationError, match=message):
        parse_challenge(value)


def _fixed_cnonce() -> str:
    return str(RFC7616["cnonce"])


def test_client_answers_rfc7616_challenge() -> None:
    client = DigestClient(Credentials("Mufasa", "Circle of Life"), cnonce=_fixed_cnonce)
    [(name, value)] = client.answer(
        [("WWW-Authenticate", RFC7616_CHALLENGE)], "GET", "/dir/index.html"
    )
    assert name == "Authorization"
    scheme, params = parse_auth_params(value)
    assert scheme == "Digest"
    assert params["response"] == (
        "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
    )
    assert params["qop"] == "auth"
    assert params["nc"] == "00000001"
    assert params["opaque"] == "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"
    assert params["algorithm"] == "SHA-256"


def test_nonce_count_increments_and_resets() -> None:
    client = DigestClient(Credentials("u", "p"))
    first = parse_challenge('Digest realm="r", nonce="n1", qop="auth"')
    counts = [parse_auth_params(client.authorization(first, "MESSAGE", "sip:a@b")[1])[1]["nc"]]
    counts.append(parse_auth_params(client.authorization(first, "MESSAGE", "sip:a@b")[1])[1]["nc"])
    second = parse_challenge('Digest realm="r", nonce="n2", qop="auth"')
    counts.append(parse_auth_params(client.authorization(second, "MESSAGE", "sip:a@b")[1])[1]["nc"])
    assert counts == ["00000001", "00000002", "00000001"]


def test_answer_prefers_first_supported_and_proxy_header() -> None:
    client = DigestClient(Credentials("u", "p"))
    headers = client.answer(
        [
            ("Proxy-Authenticate", 'Digest realm="r", nonce="a", algorithm=SHA-512-256'),
            ("Proxy-Authenticate", 'Digest realm="r", nonce="b", algorithm=SHA-256, qop=auth'),
            ("Proxy-Authenticate", 'Digest realm="r", nonce="c", algorithm=MD5, qop=auth'),
            ("Via", "SIP/2.0/UDP x"),
        ],
        "SUBSCRIBE",
        "sip:a@b",
    )
    assert [name for name, _ in headers] == ["Proxy-Authorization"]
    params = parse_auth_params(headers[0][1])[1]
    assert (params["nonce"], params["algorithm"]) == ("b", "SHA-256")


def test_per_realm_credentials_and_missing_realm() -> None:
    client = DigestClient([Credentials("alice", "a", realm="one"), Credentials("bob", "b", "two")])
    [(_, value)] = client.answer([("WWW-Authenticate", 'Digest realm="two", nonce="n"')], "M", "u")
    assert parse_auth_params(value)[1]["username"] == "bob"
    with pytest.raises(AuthenticationError, match="no answerable challenge"):
        client.answer([("WWW-Authenticate", 'Digest realm="three", nonce="n"')], "M", "u")


def test_preauthorize_reuses_last_challenge() -> None:
    client = DigestClient(Credentials("u", "p"))
    assert client.preauthorize("MESSAGE", "sip:x@y") == []
    client.answer([("WWW-Authenticate", 'Digest realm="r", nonce="n", qop=auth')], "M", "sip:x@y")
    [(name, value)] = client.preauthorize("MESSAGE", "sip:x@y")
    params = parse_auth_params(value)[1]
    assert (name, params["nc"], params["uri"]) == ("Authorization", "00000002", "sip:x@y")


def test_no_qop_challenge_uses_rfc2069_response() -> None:
    client = DigestClient(Credentials("u", "p"))
    _, value = client.authorization(Challenge("r", "n"), "REGISTER", "sip:r")
    params = parse_auth_params(value)[1]
    assert "qop" not in params and "nc" not in params
    expected = compute_response(
        algorithm="MD5",
        username="u",
        realm="r",
        password="p",
        method="REGISTER",
        uri="sip:r",
        nonce="n",
    )
    assert params["response"] == expected


# -- verifier ------------------------------------------------------------------------------

PASSWORDS = {"alice": "secret", "bob": "hunter2"}
URI = "sip:gw@jabber.sip.test"


def _verifier(algorithm: str = "MD5") -> DigestVerifier:
    return DigestVerifier("sip.test", PASSWORDS.get, b"k" * 32, 300.0, algorithm=algorithm)


def _answer(verifier: DigestVerifier, now: float, user: str, password: str, uri: str = URI) -> str:
    client = DigestClient(Credentials(user, password))
    [(_, value)] = client.answer([("WWW-Authenticate", verifier.challenge(now))], "MESSAGE", uri)
    return value


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256", "MD5-sess", "SHA-256-sess"])
def test_round_trip(algorithm: str) -> None:
    verifier = _verifier(algorithm)
    header = _answer(verifier, 1000.0, "alice", "secret")
    assert verifier.verify(header, "MESSAGE", URI, 1010.0) == Authorized("alice")


def _replace(header: str, name: str, value: str) -> str:
    scheme, params = parse_auth_params(header)
    params[name] = value
    return scheme + " " + ", ".join(f'{k}="{v}"' for k, v in params.items())


def _drop(header: str, name: str) -> str:
    scheme, params = parse_auth_params(header)
    del params[name]
    return scheme + " " + ", ".join(f'{k}="{v}"' for k, v in params.items())


def _flip(text: str, index: int) -> str:
    return text[:index] + ("B" if text[index] != "B" else "C") + text[index + 1 :]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong password", Rejected),
        ("unknown user", Rejected),
        ("uri mismatch", Rejected),
        ("no qop", Rejected),
        ("bad nc", Rejected),
        ("garbage", Rejected),
        ("no header", Rechallenge),
        ("other realm", Rechallenge),
        ("forged nonce", Rechallenge),
        ("other algorithm", Rechallenge),
    ],
)
def test_verifier_refusals(case: str, expected: type) -> None:
    verifier = _verifier()
    good = _answer(verifier, 0.0, "alice", "secret")
    header: str | None = {
        "wrong password": _answer(verifier, 0.0, "alice", "wrong"),
        "unknown user": _answer(verifier, 0.0, "mallory", "secret"),
        "uri mismatch": _answer(verifier, 0.0, "alice", "secret", uri="sip:other@x"),
        "no qop": _drop(good, "qop"),
        "bad nc": _replace(good, "nc", "zz"),
        "garbage": "Digest realm",
        "no header": None,
        "other realm": _replace(good, "realm", "elsewhere"),
        "forged nonce": _replace(good, "nonce", _flip(parse_auth_params(good)[1]["nonce"], 12)),
        "other algorithm": _replace(good, "algorithm", "SHA-256"),
    }[case]
    verdict = verifier.verify(header, "MESSAGE", URI, 5.0)
    assert isinstance(verdict, expected)
    if isinstance(verdict, Rejected):
        assert verdict.status == (403 if case in ("wrong password", "unknown user") else 400)
    if isinstance(verdict, Rechallenge):
        assert not verdict.stale
        assert parse_challenge(verdict.challenge).realm == "sip.test"


def test_stale_nonce_rechallenges_with_stale_true() -> None:
    verifier = _verifier()
    header = _answer(verifier, 0.0, "alice", "secret")
    verdict = verifier.verify(header, "MESSAGE", URI, 301.0)
    assert isinstance(verdict, Rechallenge) and verdict.stale
    assert parse_challenge(verdict.challenge).stale
    # A stale nonce with the wrong password is still just wrong.
    bad = _answer(verifier, 0.0, "alice", "nope")
    assert verifier.verify(bad, "MESSAGE", URI, 301.0) == Rejected(
        403, "unknown user or wrong password"
    )


def test_replayed_nonce_count_is_refused_and_next_count_accepted() -> None:
    verifier = _verifier()
    client = DigestClient(Credentials("bob", "hunter2"))
    challenge = parse_challenge(verifier.challenge(0.0))
    _, first = client.authorization(challenge, "MESSAGE", URI)
    _, second = client.authorization(challenge, "MESSAGE", URI)
    results = [
        verifier.verify(first, "MESSAGE", URI, 1.0),
        verifier.verify(first, "MESSAGE", URI, 2.0),
        verifier.verify(second, "MESSAGE", URI, 3.0),
    ]
    assert results[0] == Authorized("bob")
    assert isinstance(results[1], Rechallenge) and results[1].stale
    assert results[2] == Authorized("bob")


def test_auth_int_covers_the_body() -> None:
    verifier = _verifier()
    nonce = verifier.new_nonce(0.0)
    challenge = Challenge("sip.test", nonce, qop=("auth-int",))
    client = DigestClient(Credentials("alice", "secret"))
    _, header = client.authorization(challenge, "MESSAGE", URI, b"hello")
    assert parse_auth_params(header)[1]["qop"] == "auth-int"
    assert verifier.verify(header, "MESSAGE", URI, 1.0, b"hello") == Authorized("alice")
    _, header2 = client.authorization(challenge, "MESSAGE", URI, b"hello")
    assert isinstance(verifier.verify(header2, "MESSAGE", URI, 1.0, b"tampered"), Rejected)


def test_verifier_rejects_unsupported_algorithm_at_construction() -> None:
    with pytest.raises(AuthenticationError):
        DigestVerifier("r", PASSWORDS.get, b"k", algorithm="SHA-1")
