-- sipxmpp: the SIP <-> XMPP gateway as an external component (XEP-0114) of Prosody.
--
-- Include this file at the end of prosody.cfg.lua (after every global setting and VirtualHost,
-- since a Component line opens a section that lasts until the next one):
--
--     component_ports = { 5347 }
--     component_interfaces = { "127.0.0.1" }
--     ...
--     Include "/etc/prosody/sipxmpp.cfg.lua"
--
-- The gateway's settings must match: xmpp.component = "sip.xmpp.test", xmpp.secret = "secret",
-- xmpp.host/xmpp.port = the component interface and port above. The test suite includes this
-- file verbatim, with ports of its own.

Component "sip.xmpp.test"
    component_secret = "secret"
    -- Stanzas the gateway relays (long SIP MESSAGE bodies) stay far below Prosody's default
    -- component_stanza_size_limit (512 KiB); a larger stanza would close the component stream.
