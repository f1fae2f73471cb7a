"""Chat rooms for SIP users (DESIGN 6): a sans-IO core of seats in XMPP rooms (XEP-0045).

``core.RoomsCore`` is the entry point; ``model`` holds its values and effects, ``seat`` the
per-user, per-room state machine, ``services`` the disco cache, ``commands`` and ``texts`` the
room commands and the notice wording, ``ports`` the store it needs.
"""
