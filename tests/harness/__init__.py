"""Test harness: real Prosody, ejabberd, Kamailio and PJSIP on loopback, and slixmpp clients.

Fixtures live in tests/conftest.py; the pieces are importable for tests that need more control:
`ports.free_port`, `prosody.ProsodyServer`, `ejabberd.EjabberdServer`, `kamailio.KamailioServer`,
`pjsip.PjsipAgent`, `xmppclient.XmppClient` / `XmppComponent`, `rawsip.RawSipPeer`,
`gateway.gateway_toml`; the fixed test values are in `values`.
"""
