"""The gateway's configuration for a harness setup: TOML text with the DESIGN 9 key names.

End-to-end tests write this file and start the gateway with it; the values tie the gateway to
the servers the harness started (component port, Kamailio as proxy, a free SIP port).
"""

from __future__ import annotations

from tests.harness.kamailio import KamailioServer
from tests.harness.values import (
    ALIAS_DOMAIN,
    COMPONENT_DOMAIN,
    COMPONENT_SECRET,
    JDOMAIN,
    LOOPBACK,
    SIP_DOMAIN,
)
from tests.harness.xmppserver import XmppServer


def gateway_toml(
    xmpp: XmppServer,
    kamailio: KamailioServer,
    database_url: str = "sqlite:///sipxmpp.db",
    extra: str = "",
) -> str:
    """gateway.toml for a gateway between `xmpp` and `kamailio`, listening on its gateway_port.

    `extra` is appended verbatim (more sections such as [timers] or [muc]).
    """
    port = kamailio.gateway_port
    return f"""\
[xmpp]
component = "{COMPONENT_DOMAIN}"
host = "{LOOPBACK}"
port = {xmpp.component_port}
secret = "{COMPONENT_SECRET}"

[sip]
listen = ["udp:{LOOPBACK}:{port}", "tcp:{LOOPBACK}:{port}"]
domain = "{SIP_DOMAIN}"
jdomain = "{JDOMAIN}"
delimiter = "*"
aliases = {{ "{ALIAS_DOMAIN}" = "%" }}
proxy = "{kamailio.uri}"
registrar = "sip:jabber_gateway@{SIP_DOMAIN}"
trusted = ["127.0.0.0/8"]

[database]
url = "{database_url}"

[admin]
jids = ["admin@{xmpp.domain}"]

# The per-source rate limit has tests of its own; here one test source sends bursts of
# hundreds of requests on purpose, which the limit must not turn into refusals.
[limits]
sip_rate = 100000.0
sip_burst = 100000
xmpp_rate = 100000.0
xmpp_burst = 100000
{extra}"""
