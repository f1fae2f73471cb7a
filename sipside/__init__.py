"""SIP side: an asyncio SIP SIMPLE stack. Knows nothing of XMPP."""
