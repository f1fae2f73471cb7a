"""Chat rooms for SIP users (DESIGN 6): not built yet."""
