"""The fixed test values of DESIGN 9, shared by the harness, the config snippets and the tests.

The config snippets under prosody/, ejabberd/ and kamailio/ hold the same values verbatim; ports
and the gateway's SIP address are chosen at runtime and passed in by the generated main configs.
"""

from __future__ import annotations

from pathlib import Path

#: The repository root (tests/harness/values.py -> parents[2]).
REPO_ROOT = Path(__file__).resolve().parents[2]

LOOPBACK = "127.0.0.1"

XMPP_DOMAIN = "xmpp.test"
MUC_DOMAIN = "conference.xmpp.test"
COMPONENT_DOMAIN = "sip.xmpp.test"
COMPONENT_SECRET = "secret"
ALIAS_DOMAIN = "irc.xmpp.test"

SIP_DOMAIN = "sip.test"
JDOMAIN = "jabber.sip.test"

#: The user Kamailio expects the gateway to authenticate as, in the digest-challenge mode.
GATEWAY_AUTH_USER = "gateway"
GATEWAY_AUTH_PASSWORD = "gatewaysecret"
GATEWAY_AUTH_REALM = SIP_DOMAIN

PROSODY_SNIPPET = REPO_ROOT / "prosody" / "sipxmpp.cfg.lua"
EJABBERD_SNIPPET = REPO_ROOT / "ejabberd" / "sipxmpp.yml"
KAMAILIO_SNIPPET = REPO_ROOT / "kamailio" / "sipxmpp.cfg"
KAMAILIO_DISPATCHER_SNIPPET = REPO_ROOT / "kamailio" / "sipxmpp-dispatcher.cfg"
