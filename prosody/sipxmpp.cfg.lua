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
--
-- Several gateway instances: Prosody accepts one connection per component domain and refuses a
-- second one (`conflict`) while the first is up. A second instance stands by: its SIP side
-- answers, what it accepts waits in the shared queue (the active instance delivers it), and it
-- retries the component connection with backoff (at most 0.8 x timers.check_time apart), so it
-- becomes the active one within check_time of the first one's link dropping, and takes over
-- the first one's state once its heartbeat stops (see README, "Running several instances").

Component "sip.xmpp.test"
    component_secret = "secret"
    -- Stanzas the gateway relays (long SIP MESSAGE bodies) stay far below Prosody's default
    -- component_stanza_size_limit (512 KiB); a larger stanza would close the component stream.
