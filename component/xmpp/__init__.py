"""The XMPP adapter on slixmpp: stanzas in as values, values out as stanzas (DESIGN 2)."""
