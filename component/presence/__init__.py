"""Presence both ways and its persistence (DESIGN 5)."""
